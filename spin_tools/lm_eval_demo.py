"""lm-eval-harness on a demo export, against our own greedy decode on the same prompts.

    python -m spin_tools.lm_eval_demo --run runs/demo --model iter0/model --out /tmp/lm_eval_demo
    # then the command it prints:
    lm_eval --model hf --model_args pretrained=OUT/model,dtype=float32 --apply_chat_template \
        --include_path OUT/task --tasks spin_demo --batch_size 16 --output_path OUT/results

What it writes under --out:
    model/   the export, with the side files every export now carries (data/export_files.py);
             an export written before they existed gets them here, from the run's tokenizer
    task/    heldout.jsonl (the first -n held-out prompts of the run) and spin_demo.yaml: a local
             generate_until task, greedy, stop at </s>, exact match with whitespace ignored
             (the task's own rule, data/task.score, strips the answer)
and prints our exact match: generate.sample(greedy) on the same prompts, scored by data/task.score.
No dataset hub is needed: the task reads the local JSON Lines file.
"""
import argparse
import json
import os
import shutil

import torch

import generate
from data import export_files, readers, task
from data.template import ChatFormat, load_chat_template
from data.tokenizer import load_tokenizer
import spin_kernels
from hf_folder import load_model

YAML = """task: spin_demo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  do_sample: false
  max_gen_toks: {max_new}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["\\\\s"]
metadata:
  version: 1.0
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a demo run folder (train.py with no --model)")
    ap.add_argument("--model", default="iter0/model", help="the export, relative to --run")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=100, help="held-out prompts")
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.run, "config.json")))
    tok = load_tokenizer(os.path.join(a.run, "tokenizer"))
    fmt = ChatFormat(tok, load_chat_template(os.path.join(a.run, "tokenizer"), tok, cfg.get("chat_template")))
    src, model_dir = os.path.join(a.run, a.model), os.path.join(a.out, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(src, model_dir)
    if not os.path.exists(os.path.join(src, "chat_template.jinja")):
        export_files.write(model_dir, fmt)

    exs = readers.read_examples(os.path.join(a.run, "data", "heldout.jsonl"))[0][:a.n]
    os.makedirs(os.path.join(a.out, "task"), exist_ok=True)
    data = os.path.abspath(os.path.join(a.out, "task", "heldout.jsonl"))
    with open(data, "w") as f:
        for e in exs:
            f.write(json.dumps({"prompt": e.prompt[-1]["content"], "answer": e.response}) + "\n")
    with open(os.path.join(a.out, "task", "spin_demo.yaml"), "w") as f:
        f.write(YAML.format(data=data, max_new=cfg["max_new_tokens"]))

    model = spin_kernels.install(load_model(model_dir, dtype=torch.float32))  # as generate.py runs it
    prompts = [fmt.prompt_ids(e.prompt) for e in exs]
    samples = generate.sample(model, prompts, max_new_tokens=cfg["max_new_tokens"], eos_id=list(tok.eos_ids),
                              greedy=True, batch_size=50)
    answers = [tok.decode([t for t in s.tokens if t not in tok.eos_ids]) for s in samples]
    em = sum(task.score(e.prompt, ans) for e, ans in zip(exs, answers)) / len(exs)
    with open(os.path.join(a.out, "ours.jsonl"), "w") as f:
        for e, ans in zip(exs, answers):
            f.write(json.dumps({"prompt": e.prompt[-1]["content"], "answer": ans, "correct": task.score(e.prompt, ans)}) + "\n")
    print(f"our greedy exact match on {len(exs)} held-out prompts: {em:.3f}")
    print(f"lm_eval --model hf --model_args pretrained={os.path.abspath(model_dir)},dtype=float32 --apply_chat_template "
          f"--include_path {os.path.abspath(os.path.join(a.out, 'task'))} --tasks spin_demo --batch_size 16 "
          f"--log_samples --output_path {os.path.abspath(os.path.join(a.out, 'results'))}")


if __name__ == "__main__":
    main()
