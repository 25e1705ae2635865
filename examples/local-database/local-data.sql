-- Local test data: different from the cluster's, so it is plain which database answered.
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, source text NOT NULL);
INSERT INTO customers VALUES
  (1, 'Test Customer One (local fixture)', 'local'),
  (2, 'Test Customer Two (local fixture)', 'local'),
  (3, 'Test Customer Three (local fixture)', 'local');
