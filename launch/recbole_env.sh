#!/usr/bin/env bash
# Create the OPTIONAL RecBole venv used only by `python -m dllm2rec recbole`.
#
# RecBole 1.2.1 needs numpy < 2 (it uses np.float / np.bool_ aliases removed later), which
# conflicts with the main venv's numpy 2.x, so it lives in its own venv. The main package
# never imports recbole: it runs dllm2rec/recbole_runner.py with this venv's python.
#
# recbole is installed with --no-deps: its declared requirements pull in ray, hyperopt,
# plotly, ... which the quick-start path we use never imports. The list below is exactly what
# `import recbole.quick_start` + SASRec/GRU4Rec training needs (found by trying).
#
# Usage: bash launch/recbole_env.sh [VENV_DIR]   (default: <repo>/.venv-recbole)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${RECBOLE_VENV:-$ROOT/.venv-recbole}}"
PY="${PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# CPU torch, the same release as the main venv (resolves from the local wheel store).
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "numpy<2" "scipy<1.14" "pandas<2.3" "pyyaml" "tqdm" "colorlog==4.7.2" \
  "colorama==0.4.4" "tabulate" "texttable" "scikit-learn<1.6" "tensorboard" "thop" "psutil"
"${PIP[@]}" --no-deps "recbole==1.2.1"
"$VENV/bin/python" -c "import recbole, torch, numpy; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
echo "RecBole venv ready: $VENV"
