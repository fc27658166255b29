-- The orders service's own database.
CREATE TABLE orders (
    id              BIGSERIAL PRIMARY KEY,
    user_id         BIGINT NOT NULL,
    amount_cents    BIGINT NOT NULL CHECK (amount_cents >= 0),
    status          TEXT NOT NULL DEFAULT 'placed',
    idempotency_key TEXT UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A user's orders by date.
CREATE INDEX idx_order_user_date ON orders (user_id, created_at);

CREATE TABLE order_items (
    order_id    BIGINT NOT NULL REFERENCES orders (id),
    product_id  BIGINT NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

-- Sales per month, read by the report; refreshed on a schedule. The unique index lets it be
-- refreshed CONCURRENTLY, without blocking the report's reads.
CREATE MATERIALIZED VIEW monthly_sales AS
    SELECT date_trunc('month', created_at) AS month,
           sum(amount_cents)::BIGINT       AS amount_cents,
           count(*)::BIGINT                AS orders
    FROM orders
    WHERE status <> 'cancelled'
    GROUP BY 1;
CREATE UNIQUE INDEX idx_monthly_sales_month ON monthly_sales (month);
