"""An exported GGUF run by llama.cpp itself (llama-cpp-python, not a dependency of pmet): greedy answers to a
patch's rewrite, paraphrase and neighbourhood prompts from the base GGUF and the edited one.

    pip install llama-cpp-python       # builds llama.cpp from source (a C++ compiler and cmake; minutes)
    pmet export edited/ --model smollm2-135m --gguf edited.gguf
    python benchmarks/llama_cpp_check.py --patch edited/ --gguf edited.gguf [--base BASE.gguf]

Prints how many answers state target_new (pmet.evaluation.wild.states) for each model and prompt kind, and how many
neighbourhood answers begin with the same word as the base model's (the whole 20-token continuation moves
with any change of the weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def answers(path: str, prompts: list[str], tokens: int = 20) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=256, verbose=False, seed=0)
    return [llm(p, max_tokens=tokens, temperature=0.0, top_k=1)["choices"][0]["text"] for p in prompts]


def first_word(text: str) -> str:
    from pmet.evaluation.wild import normalise

    return (normalise(text).split() or [""])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=None, help="Base GGUF (default: the embedded SmolLM2).")
    args = ap.parse_args()
    from pmet.evaluation.wild import states
    from pmet.models import gguf_file
    from pmet.patch_info import read_header

    _, meta, _ = read_header(args.patch)
    reqs = json.loads(meta["requests"])
    kinds = {"rewrite": [], "paraphrase": [], "neighbourhood": []}
    for r in reqs:
        kinds["rewrite"].append((r["prompt"].replace("{}", r["subject"], 1), r["target_new"]))
        kinds["paraphrase"] += [(p, r["target_new"]) for p in r.get("paraphrase_prompts", [])]
        kinds["neighbourhood"] += [(p, r["target_new"]) for p in r.get("neighborhood_prompts", [])]
    base = str(args.base or gguf_file("smollm2-135m"))
    got = {name: {k: answers(path, [p for p, _ in v]) for k, v in kinds.items()}
           for name, path in (("base GGUF", base), ("edited GGUF", str(args.gguf)))}
    print("| llama.cpp | rewrites stating target_new | paraphrases | neighbourhood stating it | neighbourhood "
          "first word as the base's |")
    print("|---|---:|---:|---:|---:|")
    for name, a in got.items():
        s = {k: sum(states(x, t) for x, (_, t) in zip(a[k], kinds[k], strict=True)) for k in kinds}
        same = sum(first_word(x) == first_word(y)
                   for x, y in zip(a["neighbourhood"], got["base GGUF"]["neighbourhood"], strict=True))
        print(f"| {name} | {s['rewrite']}/{len(kinds['rewrite'])} | {s['paraphrase']}/{len(kinds['paraphrase'])} "
              f"| {s['neighbourhood']}/{len(kinds['neighbourhood'])} | {same}/{len(kinds['neighbourhood'])} |")


if __name__ == "__main__":
    main()
