#!/usr/bin/env bash
# Create the OPTIONAL RecBole venv used only by `python -m dllm2rec recbole`.
#
# RecBole 1.2.1 needs numpy < 2 (it uses np.float / np.bool_ aliases removed later), which
# conflicts with the main venv's numpy 2.x, so it lives in its own venv. The main package
# never imports recbole: it runs dllm2rec/compare/recbole_runner.py with this venv's python.
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
# -q; the local mirror prints harmless "Location ... is ignored" warnings.
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# CPU torch, the same release as the main venv (resolves from the local wheel store).
"${PIP[@]}" "torch==2.13.0"
# numpy/scipy/pandas/scikit-learn: dataset + evaluator imports (numpy < 2 for RecBole 1.2.1);
# colorlog/colorama/texttable/pyyaml/tqdm: recbole.utils + Config; tensorboard: every Trainer
# opens a SummaryWriter; thop/psutil: only RecBole's own quick_start (get_flops, environment
# table), kept so `recbole.quick_start.run_recbole` works too. Pins = the set verified here.
"${PIP[@]}" "numpy==1.26.4" "scipy==1.13.1" "pandas==2.2.3" "scikit-learn==1.5.2" \
  "colorlog==4.7.2" "colorama==0.4.4" "texttable==1.7.2" "pyyaml==6.0.4" "tqdm==4.70.1" \
  "tensorboard==2.21.0" "thop==0.1.1.post2209072238" "psutil==7.2.2"
"${PIP[@]}" --no-deps "recbole==1.2.1"
"$VENV/bin/python" -c "import recbole, torch, numpy; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
echo "RecBole venv ready: $VENV"
