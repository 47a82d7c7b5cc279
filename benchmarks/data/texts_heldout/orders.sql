-- Monthly revenue per region, excluding cancelled orders
CREATE TABLE IF NOT EXISTS orders (
    order_id     INTEGER PRIMARY KEY,
    customer_id  INTEGER NOT NULL REFERENCES customers(id),
    region       VARCHAR(32) NOT NULL,
    status       VARCHAR(16) DEFAULT 'open',
    total_cents  BIGINT NOT NULL CHECK (total_cents >= 0),
    created_at   TIMESTAMP NOT NULL
);

SELECT
    region,
    DATE_TRUNC('month', created_at) AS month,
    COUNT(*) AS n_orders,
    SUM(total_cents) / 100.0 AS revenue
FROM orders
WHERE status <> 'cancelled'
  AND created_at >= '2024-01-01'
GROUP BY region, DATE_TRUNC('month', created_at)
HAVING COUNT(*) > 10
ORDER BY month, revenue DESC;
