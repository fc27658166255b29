-- Issue 18: sales counted by category over worker pools.

-- The product's category when the order was placed (the catalog owns categories; an order keeps
-- what it was told, so counting sales needs no other service).
ALTER TABLE order_items ADD COLUMN category TEXT NOT NULL DEFAULT '';

-- A count split into partitions of the orders table, each counted by a worker.
CREATE TABLE analytics_jobs (
    id         BIGSERIAL PRIMARY KEY,
    partitions INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What each partition counted; a partition counted twice (a redelivery) adds nothing.
CREATE TABLE analytics_partials (
    job_id      BIGINT NOT NULL REFERENCES analytics_jobs (id),
    part        INTEGER NOT NULL,
    category    TEXT NOT NULL,
    sales       BIGINT NOT NULL,
    counted_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, part, category)
);

-- Partitions counted, even those with no sale.
CREATE TABLE analytics_done (
    job_id     BIGINT NOT NULL REFERENCES analytics_jobs (id),
    part       INTEGER NOT NULL,
    done_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, part)
);
