-- Issue 18: the order flow is driven by events.

-- An order's history, append-only: its state is the fold of these (src/saga.rs).
CREATE TABLE order_events (
    id         BIGSERIAL PRIMARY KEY,
    order_id   BIGINT NOT NULL REFERENCES orders (id),
    seq        INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    data       JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Two deliveries deciding the same step at once: the second one's append fails.
    UNIQUE (order_id, seq)
);

-- Messages to publish, written in the same transaction as what they announce; the relay
-- publishes them to Surge's queues and marks them sent.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    queue      TEXT NOT NULL,
    payload    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at    TIMESTAMPTZ
);
CREATE INDEX idx_outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

-- Messages whose effect is recorded: a redelivery finds its id and does nothing again.
CREATE TABLE processed_messages (
    message_id   TEXT PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The read model, kept by the projection from the events (CQRS).
CREATE TABLE order_summaries (
    order_id     BIGINT PRIMARY KEY,
    user_id      BIGINT NOT NULL,
    status       TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    events       INTEGER NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_summary_user ON order_summaries (user_id, order_id);

-- Sales are what was paid.
DROP MATERIALIZED VIEW monthly_sales;
CREATE MATERIALIZED VIEW monthly_sales AS
    SELECT date_trunc('month', created_at) AS month,
           sum(amount_cents)::BIGINT       AS amount_cents,
           count(*)::BIGINT                AS orders
    FROM orders
    WHERE status = 'paid'
    GROUP BY 1;
CREATE UNIQUE INDEX idx_monthly_sales_month ON monthly_sales (month);

-- What placing the order answered: a repeat with the same Idempotency-Key gets it again.
ALTER TABLE orders ADD COLUMN first_answer JSONB;
