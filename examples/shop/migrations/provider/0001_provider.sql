-- The card processor stand-in keeps its own books, as a real one does.
CREATE TABLE charges (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    amount_cents    BIGINT NOT NULL,
    card_last4      TEXT NOT NULL,
    status          TEXT NOT NULL,
    refunded        BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
