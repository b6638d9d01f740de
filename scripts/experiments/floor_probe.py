"""The digit models against a microphone floor around a word (issue 27, item 4): theo's clips as
clips (original, trimmed, at -26 dBFS) and with a -90 dBFS white floor around them, then the same
words in a stream with 1 s pauses. Prints named-right per variant and the words that differ.

    python scripts/experiments/floor_probe.py [held-out|validation] [fsdd|asc]    # ~1 min
"""
import sys, numpy as np
from pathlib import Path
from streamd import config as config_mod
from streamd.models.inference import load_models
from streamd.offline import eval_stream as es
from streamd.audio.stream_audio import Condition, build, speech_span, dbfs_to_rms, white
from streamd.signal.vad import heard_utterance
from streamd.models import digits as digit_rule

cfg = config_mod.load(Path("config.toml"), [])
models = load_models(cfg, "cpu")
held = es.load_held_out(Path("../shared/datasets"), sys.argv[1] if len(sys.argv) > 1 else "held-out")
corpus = sys.argv[2] if len(sys.argv) > 2 else "fsdd"
words = [w for w in held.words if w.corpus == corpus and w.digit is not None]
rng = np.random.default_rng(0)
words = [words[i] for i in rng.choice(len(words), 150, replace=False)]
minc = models.digits.min_confidence(cfg.digits.min_confidence)

def decide(audio):
    speech, heard = heard_utterance(audio, cfg.vad)
    lg = models.digits.run(models.digits.features_of(speech))
    d = digit_rule.decide(lg, minc)
    return d.digit, int(np.argmax(lg)), len(speech) / 16000

def variant(w, kind):
    a, b, power = speech_span(w.audio)
    m = 800
    a0, b0 = max(0, a - m), min(len(w.audio), b + m)
    clip = w.audio[a0:b0].astype(np.float64)
    if kind == "trim":
        return clip.astype(np.int16)
    clip = clip * dbfs_to_rms(-26) / np.sqrt(power)
    if kind == "trim26":
        return np.clip(np.round(clip), -32768, 32767).astype(np.int16)
    if kind == "trim26floor":
        x = np.concatenate([np.zeros(8000), clip, np.zeros(8000)])
        x = x + white(len(x), rng) * dbfs_to_rms(-90)
        return np.clip(np.round(x), -32768, 32767).astype(np.int16)

res = {}
for kind in ["orig", "trim", "trim26", "trim26floor"]:
    out = []
    for w in words:
        out.append(decide(w.audio if kind == "orig" else variant(w, kind)))
    right = np.mean([o[0] == w.digit for o, w in zip(out, words)])
    choice = np.mean([o[1] == w.digit for o, w in zip(out, words)])
    res[kind] = out
    print(kind, f"named {right:.3f} choice {choice:.3f} mean cut {np.mean([o[2] for o in out]):.2f}s", flush=True)

cond = Condition("pause_1", "pause", pause_s=(1.0, 1.0))
built = build(cond, words, np.random.default_rng(1), held.talkers)
events, _ = es.run_streams(cfg, models, None, {"s": built.audio})
r = es.score(built, events["s"], set())
print("stream", r["digits"], r["segmentation"])
utts, _ = es.utterances(events["s"])
for j, p in enumerate(built.words):
    us = [u for u in utts if es._overlap(u, p) >= 0.05]
    sd = [u.digit for u in us]
    if sd != [p.word.digit] or res["orig"][j][0] != p.word.digit:
        print(j, "truth", p.word.digit, "orig", res["orig"][j][:2], "trim26floor", res["trim26floor"][j][:2], "stream", sd,
              [(round(u.t_start - p.t_start, 2), round(u.t_end - p.t_end, 2)) for u in us])
