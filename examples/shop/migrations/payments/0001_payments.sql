-- The payments service's own database: what it asked the card processor, and what it answered.
CREATE TABLE charges (
    id                 BIGSERIAL PRIMARY KEY,
    order_id           BIGINT NOT NULL,
    amount_cents       BIGINT NOT NULL CHECK (amount_cents > 0),
    -- succeeded, declined, or unknown (the processor did not answer: it is asked again)
    status             TEXT NOT NULL,
    provider_charge_id TEXT,
    decline_reason     TEXT,
    idempotency_key    TEXT NOT NULL UNIQUE,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_charge_order ON charges (order_id);

CREATE TABLE refunds (
    id                 BIGSERIAL PRIMARY KEY,
    charge_id          BIGINT NOT NULL UNIQUE REFERENCES charges (id),
    provider_refund_id TEXT NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
