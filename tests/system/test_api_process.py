"""The API process stays light: importing it never imports torch or the ML stack."""

import subprocess
import sys


def test_api_never_imports_torch() -> None:
    code = ("import sys, app.api.main, app.serve; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', "
            "'bitsandbytes', 'datasets') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workers_never_import_the_web_framework() -> None:
    code = ("import sys, worker.tasks, worker.train.recipe, worker.serve.pool; "
            "web = [m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules]; print(web); "
            "sys.exit(1 if web else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
