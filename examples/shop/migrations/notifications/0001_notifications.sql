-- The notifications service's own database: every notification "sent".
CREATE TABLE notifications (
    id         BIGSERIAL PRIMARY KEY,
    order_id   BIGINT NOT NULL,
    user_id    BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    message    TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- One notification of a kind per order, however often it is asked for.
    UNIQUE (order_id, kind)
);
