"""Build OUT/init, the Expr24 scratch reference, exactly as train.py's run() does (seed 0, 20,000 random valid
expressions of 3..9 characters, 600 warm-up steps) but with another width or depth, so that a later
`python train.py --task expr24 --out OUT ...` starts from it (run() keeps an existing OUT/init).

    python -m research.oracle_init OUT --n-embd 128 --n-layer 3 --n-head 4
"""
import argparse
import os

import numpy as np
import torch

import model as modellib
from tasks.expr24.task import Expr24Task

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("out")
p.add_argument("--n-embd", type=int, default=64)
p.add_argument("--n-layer", type=int, default=3)
p.add_argument("--n-head", type=int, default=4)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
task = Expr24Task()
torch.manual_seed(args.seed)
texts = task.random_objects(20000, np.random.default_rng(args.seed), 3, 9)
modellib.build_scratch_model(os.path.join(args.out, "init"), sorted(task.charset), warmup_texts=texts,
                             n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
