"""What `taskprune info` says about a profile, a pruned checkpoint or an unpruned checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def describe(path: Path) -> list[str]:
    """Lines describing the profile or checkpoint directory `path`."""
    if (path / "profile.json").is_file():
        return _profile_lines(path)
    if (path / "pruning.json").is_file():
        rec = _read_json(path / "pruning.json")
        try:
            return _pruned_lines(path, rec)
        except (KeyError, TypeError, ValueError) as err:  # a record edited or written by something else
            raise ValueError(f"{path / 'pruning.json'} is not the record taskprune writes ({type(err).__name__}: "
                             f"{err}); prune the checkpoint again") from None
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        return [f"unpruned checkpoint {path}: {cfg.get('model_type')}, d_ff {cfg.get('intermediate_size')}, "
                f"{cfg.get('num_hidden_layers')} layers"]
    raise FileNotFoundError(f"{path} is neither a profile (profile.json) nor a checkpoint (config.json)")


def score_lines(scorer: str, profile, scores) -> list[str]:
    """`taskprune score`'s summary: per layer, how many neurons lean to the target (S > 0) or away."""
    lines = [f"{scorer} scores, {profile.num_layers} layers x {profile.d_ff} neurons (target {profile.target}; "
             f"distractors {', '.join(profile.distractors)}); low scores are pruned first",
             "layer  positive(S>0)  negative(S<0)  min      max"]
    return lines + [f"{i:5d}  {int((row > 0).sum()):13d}  {int((row < 0).sum()):13d}  {row.min():7.3g}  {row.max():7.3g}"
                    for i, row in enumerate(scores)]


def _profile_lines(path: Path) -> list[str]:
    from taskprune.profile import load_profile, profile_hash
    from taskprune.scoring import score
    profile = load_profile(path)
    m, c = profile.meta["model"], profile.meta["capture"]
    lines = [f"profile {path} (hash {profile_hash(path)}, format {profile.meta['format_version']})",
             f"  model {m.get('spec')} ({m.get('model_type')}, revision {m.get('revision')}, config hash "
             f"{m['config_hash']}), {m['num_layers']} layers x d_ff {m['d_ff']}",
             f"  capture: template {c.get('template')}, content {c.get('content')}, max length "
             f"{c.get('max_length')}, dtype {c.get('dtype')}, seed {c.get('seed')}, token statistics "
             f"{'yes' if profile.stats[profile.target].has_token_stats else 'no'}"]
    for s in profile.meta["sets"]:
        st = profile.stats[s["name"]]
        lines.append(f"  {s['role']:10s} {s['name']}: {st.n} prompts of {s.get('available')}, {st.tokens} tokens, "
                     f"{st.truncated} truncated")
    if profile.distractors:
        sel = score("selectivity", profile)
        lines.append(f"  selectivity: {int((sel > 0).sum())} target-leaning and {int((sel < 0).sum())} "
                     f"distractor-leaning neurons in all")
    return lines


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({getattr(err, 'msg', err)}); it is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object; it is damaged")
    return data


def _pruned_lines(path: Path, rec: dict) -> list[str]:
    p, src = rec["plan"], rec["source_model"]
    lines = [f"pruned checkpoint {path}",
             f"  source {src['spec']} ({src['kind']}, revision {src['revision']})",
             f"  strategy {p['strategy']}, scorer {rec['scorer']}, seed {p['seed']}, ratio {p['ratio_nominal']} "
             f"nominal / {p['ratio_exact']:.4f} exact, align {p['align']}",
             f"  d_ff {p['d_ff']} -> {p['kept_width']} in {len(p['keep'])} layers",
             f"  parameters {rec['parameters']['before']:,} -> {rec['parameters']['after']:,}"]
    if rec.get("profile"):
        pr = rec["profile"]
        lines.append(f"  profile {pr['path']} (hash {pr['hash']}): target {pr['target']}, "
                     f"distractors {', '.join(pr['distractors'])}")
    return lines
