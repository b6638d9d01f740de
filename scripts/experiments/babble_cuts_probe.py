import sys, zlib
import numpy as np
from pathlib import Path
from streamd.config import load
from streamd.offline.eval_stream import load_held_out, pick_words
from streamd.audio.stream_audio import standard_conditions, build
from streamd.audio.frames import Frame, SAMPLE_RATE
from streamd.signal.vad import Segmenter, SpeechEnd
from streamd.models.inference import load_digits
cfg = load(Path("config.toml"))
digits = load_digits(cfg, "cpu")
held = load_held_out(Path("/work/shared/datasets"), "validation")
chosen = pick_words(held.words, 80, np.random.default_rng(0))
conds = {c.name: c for c in standard_conditions(0)}
pre, tail = cfg.vad.preroll_ms/1000, cfg.vad.tail_ms/1000
def classify(a):
    feats = digits.features_of(a)
    return int(np.argmax(digits.combine([m.run(feats[m.params]) for m in digits.members.values()])))
for name in sys.argv[1].split(","):
    c = conds[name]
    b = build(c, chosen, np.random.default_rng([0, zlib.crc32(c.name.encode())]), held.talkers)
    seg = Segmenter(cfg.vad); step = cfg.vad.frame_samples; ends = []
    for i in range(len(b.audio)//step):
        f = Frame("s", i, np.ascontiguousarray(b.audio[i*step:(i+1)*step]), i*step/SAMPLE_RATE, 0.0)
        ends += [o for o in seg.push(f) if isinstance(o, SpeechEnd) and o.usable]
    res = {"truth": [0,0], "vad": [0,0], "vad_ext": [0,0]}
    for w in b.words:
        if w.word.digit is None: continue
        d = w.word.digit
        a = b.audio[int((w.t_start-pre)*SAMPLE_RATE):int((w.t_end+tail)*SAMPLE_RATE)]
        res["truth"][0] += classify(a) == d; res["truth"][1] += 1
        ov = [e for e in ends if min(e.t_end, w.t_end) - max(e.t_start, w.t_start) > 0.05]
        if ov:
            e = max(ov, key=lambda e: min(e.t_end, w.t_end) - max(e.t_start, w.t_start))
            s0, s1 = e.model_span(cfg.vad)
            res["vad"][0] += classify(b.audio[int(s0*SAMPLE_RATE):int(s1*SAMPLE_RATE)]) == d
            res["vad_ext"][0] += classify(b.audio[int(s0*SAMPLE_RATE):int((s1+0.2)*SAMPLE_RATE)]) == d
        res["vad"][1] += 1; res["vad_ext"][1] += 1
    print(name, {k: f"{v[0]/max(v[1],1):.1%} of {v[1]}" for k, v in res.items()}, flush=True)
