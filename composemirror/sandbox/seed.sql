-- The shared environment's data: what the cluster's database holds.
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, source text NOT NULL);
INSERT INTO customers VALUES
  (1, 'Ada (shared staging data)', 'cluster'),
  (2, 'Grace (shared staging data)', 'cluster');
