"""The checkout service's integration tests, as a CI job runs them (exit 0 when all pass).

They use the deployed checkout's own configuration, imported by composemirror: DATABASE_URL
names the cluster's shared database but reaches the job's local one (`hosts` in compose.yaml),
so the tests may write to it; ORDERS_URL reaches the orders service in the cluster.
"""

import json
import os
import subprocess
import sys
import urllib.request


def sql(statement: str) -> str:
    """Run one statement on DATABASE_URL with psql; its output, tab-separated."""
    result = subprocess.run(
        [
            "psql",
            os.environ["DATABASE_URL"],
            "-v",
            "ON_ERROR_STOP=1",
            "-AtF",
            "\t",
            "-c",
            statement,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_the_database_is_the_local_one() -> None:
    # The shared database has a customers table; the job's own starts empty.
    assert sql("SELECT to_regclass('customers') IS NULL") == "t"
    sql("CREATE TABLE IF NOT EXISTS carts (id int PRIMARY KEY, items int NOT NULL)")
    sql("INSERT INTO carts VALUES (1, 3) ON CONFLICT (id) DO UPDATE SET items = 3")
    assert sql("SELECT items FROM carts WHERE id = 1") == "3"


def test_orders_come_from_the_cluster() -> None:
    with urllib.request.urlopen(os.environ["ORDERS_URL"], timeout=30) as response:
        body = json.load(response)
    assert body["source"] == "cluster"
    assert body["orders"], body


def test_the_deployed_environment_was_imported() -> None:
    assert os.environ["PAYMENTS_MODE"] == "sandbox"


def main() -> int:
    failed = 0
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_")]
    for name, test in tests:
        try:
            test()
        except Exception as e:  # a test job reports every failure, then fails
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            print(f"ok   {name}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
