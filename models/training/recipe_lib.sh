# Shell helpers shared by the training recipes (from_scratch.sh, train_on_b.sh,
# train_randomised.sh); sourced from this folder. They read the recipe's PY (python) and C
# (cache folder).

# cache_root ROOT: caches an RSNA-layout root through data.py (uint8 windowed volumes, ~1 MB a
# study, in $C/<basename ROOT>) and deletes its DICOM and masks, which would take tens of GB.
cache_root() {
  if [ -d "$1/train_images" ]; then
    "$PY" -c "from data import load_dataset; load_dataset('$1', '$C/$(basename "$1")', workers=2)"
    rm -rf "$1/train_images" "$1/segmentations"
  fi
}

# random_init OUT SEED: random weights in the shipped (pruned) architecture: half the default
# widths and the 16-channel fracture branch.
random_init() {
  "$PY" -c "
import torch
from model import DEFAULT_WIDTHS, TriageNet, save_checkpoint
torch.manual_seed($2)
save_checkpoint(TriageNet(widths={k: v // 2 for k, v in DEFAULT_WIDTHS.items()}, frac_hires=16), '$1')"
}
