#!/usr/bin/env bash
# Reproduce the paper's evaluation (METHOD §6) with real Stable Diffusion weights and your own photos:
# learn every person in REF_DIR, write the benchmark prompts, draw them with the official sampling
# settings, score them with a face network that did NOT train the identities, and print our ID and
# prompt scores beside the paper's scatter means.
#
#   bash scripts/reproduce-paper.sh MODEL REF_DIR [OUT] [EXTRA FLAGS...]
#
# MODEL    hub id, diffusers folder or single-file checkpoint of SD 1.x/2.x; `tiny` = the tiny random
#          model (--tiny; images are noise, for trying the script); `toy` = the packaged toy world of
#          cartoon people (--toy; 64 px, its own face network trains and evaluates: REF_DIR holds renders).
# REF_DIR  one photo per person (the file name is the name: `Ann Lee.jpg` -> <Ann_Lee>), or one
#          subfolder of photos per person.
# OUT      results folder (default reproduce-paper/): identities/, prompts.txt, images/, report/,
#          table.md. Re-running resumes: learned people are skipped.
# EXTRA FLAGS go to both `add-many` and `generate` (model and device flags: --device, --dtype,
#          --model-config, --revision, --seed ...).
#
# Environment:
#   EVAL_ENCODER      evaluation face network, arcface:/path/backbone.pth or onnx:/path/model.onnx.
#                     Without it the ID similarity is measured with dlib, the network that trained the
#                     identities, and reads high (a loud warning says so).
#   CELEBBASIS_FLAGS  more flags for add-many and generate (like EXTRA FLAGS);
#   ADD_FLAGS         flags for add-many only (e.g. "--steps 400 --group-size 2");
#   GENERATE_FLAGS    flags for generate only (e.g. "--num-images 4 --batch-images 8"; the paper's
#                     preset draws at the model's native size: 512 px on SD 1.x, as the paper);
#   EVAL_FLAGS        flags for evaluate only (e.g. "--clip-model PATH" offline, or "--no-clip");
#   PROMPTS_PER_CATEGORY  draw only the first N prompts of each category (a quick look; default: all);
#   CELEBBASIS_PYTHON a Python that has celebbasis (its src/ is put first on the path); default: the
#                     project's .venv, set up by scripts/setup.sh.
set -euo pipefail

usage() {
  echo "usage: bash scripts/reproduce-paper.sh MODEL REF_DIR [OUT] [EXTRA FLAGS...]   (MODEL: hub id, folder, .safetensors, 'toy' or 'tiny')" >&2
  exit 2
}
[ $# -ge 2 ] || usage
case "$1" in -h|--help) usage ;; esac
MODEL=$1
REF_DIR=$2
shift 2
OUT=reproduce-paper
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  OUT=$1
  shift
fi
[ -d "$REF_DIR" ] || { echo "error: $REF_DIR is not a folder. Pass a folder with one photo (or subfolder of photos) per person." >&2; exit 2; }
[ -n "$MODEL" ] || usage

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${CELEBBASIS_PYTHON:-}" ]; then
  PY=$CELEBBASIS_PYTHON
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
  bash "$ROOT/scripts/setup.sh"
  PY=$ROOT/.venv/bin/python
fi
cb() { "$PY" -m celebbasis.cli "$@"; }

if [ "$MODEL" = tiny ]; then
  MODEL_FLAGS=(--tiny)
elif [ "$MODEL" = toy ]; then  # its own face network (nothing else reads cartoon faces)
  MODEL_FLAGS=(--toy)
  EVAL_ENCODER=${EVAL_ENCODER:-toy}
else
  MODEL_FLAGS=(--model "$MODEL")
fi
read -r -a COMMON <<< "${CELEBBASIS_FLAGS:-}"
read -r -a ADD <<< "${ADD_FLAGS:-}"
read -r -a GEN <<< "${GENERATE_FLAGS:-}"
read -r -a EVAL <<< "${EVAL_FLAGS:-}"
COMMON+=("$@")
mkdir -p "$OUT"

say() { printf "\n== [%d s] %s\n" "$SECONDS" "$*" >&2; }

say "1/4 learning everyone in $REF_DIR -> $OUT/identities/"
rc=0
cb add-many "$REF_DIR" -o "$OUT/identities" "${MODEL_FLAGS[@]}" ${COMMON[@]+"${COMMON[@]}"} ${ADD[@]+"${ADD[@]}"} || rc=$?
if [ "$rc" = 1 ]; then
  echo "warning: some photos could not be learned (see above); evaluating the people that were." >&2
elif [ "$rc" != 0 ]; then
  exit "$rc"
fi

# name<TAB>photo-or-folder for every person in REF_DIR that has an identity, named as add-many names them.
PEOPLE=$("$PY" - "$REF_DIR" "$OUT/identities" <<'EOF'
import sys
from pathlib import Path

from celebbasis.many import people_in

folder, identities = sys.argv[1], Path(sys.argv[2])
for person in people_in(folder):
    if (identities / f"{person.name}.safetensors").is_file():
        ref = person.photos[0] if len(person.photos) == 1 else person.photos[0].parent
        print(f"{person.name}\t{ref}")
EOF
)
[ -n "$PEOPLE" ] || { echo "error: no identity was learned; nothing to evaluate." >&2; exit 1; }
NAMES=()
IDENTITIES=()
REFERENCES=()
while IFS=$'\t' read -r name ref; do
  NAMES+=("$name")
  IDENTITIES+=(--identity "$OUT/identities/$name.safetensors")
  REFERENCES+=(--reference "$name=$ref")
done <<< "$PEOPLE"

say "2/4 the paper's benchmark prompts for ${#NAMES[@]} person(s) -> $OUT/prompts.txt"
cb benchmark-prompts "${NAMES[@]}" -o "$OUT/prompts.txt" --overwrite
if [ -n "${PROMPTS_PER_CATEGORY:-}" ]; then
  awk -F'\t' -v n="$PROMPTS_PER_CATEGORY" 'seen[$1]++ < n' "$OUT/prompts.txt" > "$OUT/prompts.txt.tmp"
  mv "$OUT/prompts.txt.tmp" "$OUT/prompts.txt"
  echo "PROMPTS_PER_CATEGORY=$PROMPTS_PER_CATEGORY: kept $(wc -l < "$OUT/prompts.txt") prompts" >&2
fi

# What will run: the preset with GENERATE_FLAGS on top, read through the CLI's own parser.
SAMPLING=$("$PY" - ${COMMON[@]+"${COMMON[@]}"} ${GEN[@]+"${GEN[@]}"} <<'EOF'
import sys
from celebbasis.cli import _generate_config, build_parser
from celebbasis.cli_flags import merged
parser = build_parser()
args, _ = parser.parse_known_args(["generate", "x", "--preset", "paper", *sys.argv[1:]])
c = _generate_config(merged(parser, args))
size = f"{c.width}x{c.height} px" if c.height else "the model's size"
print(f"{c.scheduler.upper()}, {c.steps} steps, guidance {c.guidance:g}, {size}, seed {c.seed}, {c.num_images} image(s) per prompt")
EOF
) || SAMPLING="--preset paper with GENERATE_FLAGS on top"
say "3/4 drawing them ($SAMPLING) -> $OUT/images/"
rm -rf "$OUT/images"
cb generate --prompts-file "$OUT/prompts.txt" --preset paper "${IDENTITIES[@]}" -o "$OUT/images" "${MODEL_FLAGS[@]}" \
  ${COMMON[@]+"${COMMON[@]}"} ${GEN[@]+"${GEN[@]}"}

say "4/4 evaluating -> $OUT/report/"
if [ -n "${EVAL_ENCODER:-}" ]; then
  ENCODER=(--eval-encoder "$EVAL_ENCODER")
else
  ENCODER=()
  cat >&2 <<'EOF'

  ###########################################################################################
  #  WARNING: no EVAL_ENCODER given. The ID similarity is measured with dlib, the network    #
  #  that TRAINED the identities, so it reads HIGH and is not comparable with the paper's.   #
  #  Set EVAL_ENCODER=arcface:/path/backbone.pth or EVAL_ENCODER=onnx:/path/model.onnx.       #
  ###########################################################################################

EOF
fi
cb evaluate "$OUT/images" "${REFERENCES[@]}" "${IDENTITIES[@]}" ${ENCODER[@]+"${ENCODER[@]}"} -o "$OUT/report" \
  ${EVAL[@]+"${EVAL[@]}"}

"$PY" - "$OUT/report/report.json" "$OUT/table.md" "$MODEL" "${EVAL_ENCODER:-dlib (the training network: reads high)}" <<'EOF'
import json
import sys

report_path, table_path, model, encoder = sys.argv[1:5]
report = json.load(open(report_path, encoding="utf-8"))


def num(x, scale=1.0):
    return "-" if x is None else f"{x * scale:.3f}"


# report.json's CLIP score is 100 * cos; the paper plots the cosine itself (0-1).
rows = [(f"**celebbasis, this run** ({report['n_images']} images)", report.get("id_similarity_mean"),
         report.get("clip_score_mean"), report.get("face_detection_rate"))]
for cat, r in sorted(report.get("categories", {}).items()):
    rows.append((f"&nbsp;&nbsp;{cat} ({r.get('n_images', '?')})", r.get("id_similarity_mean"), r.get("clip_score_mean"),
                 r.get("face_detection_rate")))
paper = [("CelebBasis (paper)", 0.207, 0.255), ("Textual Inversion (paper)", 0.296, 0.163),
         ("DreamBooth (paper)", 0.051, 0.200), ("Custom Diffusion (paper)", 0.139, 0.263)]
lines = [f"Model: {model}. ID similarity: {encoder}. Prompt score: CLIP cosine (0-1; report.json holds 100 x cos).",
         "", "| method | ID similarity | prompt score (CLIP cos) | faces found |", "|---|---|---|---|"]
lines += [f"| {name} | {num(i)} | {num(c, 0.01)} | {num(f)} |" for name, i, c, f in rows]
lines += [f"| {name} | {i:.3f} | {c:.3f} | - |" for name, i, c in paper]
lines += ["", "The paper's rows are the means of its scatter plot of ID similarity (CosFace sphere20 on VGGFace2) "
          "against CLIP score; an ID similarity measured with another face network is on that network's scale."]
text = "\n".join(lines) + "\n"
open(table_path, "w", encoding="utf-8").write(text)
print(text, end="")
EOF
echo "(also in $OUT/table.md; the full report is $OUT/report/report.md)" >&2
