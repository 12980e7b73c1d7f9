import os
import uuid

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PG_ADMIN_URL = os.environ.get("ARBOR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def tiny_policy():
    """An untrained built-in policy (coupled positions), built once per session."""
    from agent.policy import Policy, build_builtin_policy

    model, tok = build_builtin_policy()
    model.eval()
    return Policy(model, tok, "v-test")


@pytest.fixture()
def pg_url():
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"arbor_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def one_torch_thread():
    """2 torch threads on a shared 2-core machine spin against each other: 1 thread ran the search tests 5x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
