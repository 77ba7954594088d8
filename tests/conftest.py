import pytest

from tests.e2e.harness import Harness


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    try:
        yield h
        # An upstream only ever sees complete attempts: a request whose body never arrived
        # whole is a failure of rollsafe's promise unless the test says it expects one.
        if not h.allow_aborted:
            aborted = [(p.name, a) for p in h.pods for a in p.aborted()]
            assert not aborted, f"pods saw aborted requests: {aborted[:5]}"
    finally:
        h.close()
