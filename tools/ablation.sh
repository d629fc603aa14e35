#!/usr/bin/env bash
# The recipe ablation of issue 18 (docs/results.md): every row is flags/ablation.cfg plus the flags below, one
# run directory per row under $1 (default runs/ablation). Rows run one after another (never two TensorFlow
# processes at once on 2 cores); a finished row is a no-op, an interrupted one resumes where it stopped.
#   bash tools/ablation.sh [ROOT] [ROW ...]     # e.g. bash tools/ablation.sh runs/ablation baseline scse
set -u
cd "$(dirname "$0")/.."
root=${1:-runs/ablation}
shift || true
declare -A ROWS=(
  [baseline]=""
  [lovasz_sym]="--loss=bce:1,lovasz_sym_elu:1"
  [deep_supervision]="--deep_supervision"
  [hypercolumn]="--hypercolumn"
  [scse]="--se_type=scse"
  [pad128]="--input_size=128"
  [augment]="--zoom=1.2 --brightness=0.1 --contrast=0.1"
  [combined]="--loss=bce:1,lovasz_sym_elu:1 --deep_supervision --hypercolumn --se_type=scse --input_size=128 --zoom=1.2 --brightness=0.1 --contrast=0.1 --swa_epochs=4"
)
ORDER=(baseline lovasz_sym deep_supervision hypercolumn combined pad128 scse augment)
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=("${ORDER[@]}")
for row in "${rows[@]}"; do
  if [ -z "${ROWS[$row]+x}" ]; then echo "unknown row $row; rows: ${ORDER[*]}" >&2; exit 2; fi
  echo "== $row: python -m salt_tf.train --flagfile=flags/ablation.cfg --model_dir=$root/$row ${ROWS[$row]}"
  # shellcheck disable=SC2086
  python -m salt_tf.train --flagfile=flags/ablation.cfg --model_dir="$root/$row" ${ROWS[$row]} || exit $?
done
