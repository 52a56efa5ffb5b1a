"""mio.eval: `mio eval`, the paper's benchmark metrics over a model's generations.

metrics  CIDEr/BLEU-4 (pycocoevalcap), VQAv2 accuracy, WER (jiwer + Whisper's normalizer),
         CLIP score, exact match; the ASR and CLIP models behind TTS WER and CLIP score
tasks    eval tasks and the items a prepared dataset gives them
run      answer, score, write (generations.jsonl, metrics.json, report.html)
report   the HTML page; cli: `mio eval`
"""
