"""Writes tests/golden/space_timesteps.json: guided-diffusion's own respace.space_timesteps on the
cases below, for tests/test_schedule.py. Run with the path of a checkout of openai/guided-diffusion
(not part of this repository): python tests/golden/make_space_timesteps.py /path/to/guided-diffusion"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from guided_diffusion.respace import space_timesteps  # noqa: E402 (their code, from the path given)

# the published samplers' respacings, then section lists whose fractional strides round near .5
CASES = [(1000, "250"), (1000, "ddim25"), (1000, "ddim50"), (1000, "100"), (4000, "50"), (4000, "ddim100"),
         (1000, "10,15,20"), (300, "10,15,20"), (1000, "27"), (1000, "1"), (7, "3,2"), (1000, "ddim1000")]
rng = random.Random(0)
for _ in range(24):
    T, k = rng.randint(2, 1200), rng.randint(1, 4)
    CASES.append((T, ",".join(str(rng.randint(1, T // k)) for _ in range(k))))
REFUSED = [(1000, "ddim999"), (100, "60,60"), (10, "11")]  # no integer stride; sections too short

golden = {"kept": [[T, s, sorted(space_timesteps(T, s))] for T, s in CASES], "refused": []}
for T, s in REFUSED:
    try:
        space_timesteps(T, s)
    except ValueError:
        golden["refused"].append([T, s])
    else:
        raise SystemExit(f"space_timesteps({T}, {s!r}) was expected to refuse")
Path(__file__).with_name("space_timesteps.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
