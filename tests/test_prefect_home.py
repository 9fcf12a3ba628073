"""The tests run on a Prefect home of their own, never the user's: tests/conftest.py sets PREFECT_HOME to a folder of
the session before Prefect is imported, and the processes the tests start inherit it. (Before, a test's `a2k
classify` ran on ~/.prefect/prefect.db and left a run "Running" in the user's UI; in-process flows kept their results
and memo store under ~/.prefect too.)"""

import json
import os
import subprocess
import sys

from tests.conftest import PREFECT_HOME, USER_PREFECT_HOME

SETTINGS = ("from prefect.settings import get_current_settings as s; import json; x = s(); "
            "print(json.dumps([str(x.home), str(x.results.local_storage_path), "
            "x.server.database.connection_url.get_secret_value(), str(x.api.url)]))")


def test_the_session_and_a_process_it_starts_use_a_temporary_prefect_home():
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    assert USER_PREFECT_HOME != PREFECT_HOME and settings.home == PREFECT_HOME
    assert settings.results.local_storage_path.is_relative_to(PREFECT_HOME)
    # as test_kill_and_resume starts `a2k classify`: our environment without the harness's URL
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-c", SETTINGS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    home, storage, database, api = json.loads(out.stdout.splitlines()[-1])
    assert home == str(PREFECT_HOME) and storage.startswith(str(PREFECT_HOME)), (home, storage)
    assert str(PREFECT_HOME / "prefect.db") in database, database  # the temporary server it starts keeps its runs here
    assert api == "None"  # no user's server either: it starts its own
