"""Phantom family B: a second synthetic cervical-spine CT generator, independent of
`cspine-triage synth` (family A) in how anatomy, bone texture, acquisition and fractures are
made, so a model trained on one family can be tested on the other (cross_generator.py).

    python3 -m phantoms_b OUT --count 40 --seed 9100 --fracture half   (from models/training)

Modules: shapes (primitives, numpy filters), spine (the column), body (everything else),
fractures (cut-and-displace mechanisms), scanner (slice profile, kernel, noise, artefacts),
writer (DICOM, NIfTI, ground truth, train.csv), study (one study end to end).
Synthetic phantoms, not patients: no number derived from them is clinical.
"""

VERSION = "b-0.1.0"
