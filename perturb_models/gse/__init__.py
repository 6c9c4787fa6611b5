"""Gene set enrichment (PerturbQA's third task): name what a cluster of genes shares.

``scoring`` (ROUGE-1 recall, BERTScore), ``enrichment`` (GO over-representation baseline),
``namer`` (LoRA causal-LM namer trained on GO terms), ``runner`` (``train.py``/``evaluate.py`` for
``data=k562_gse``).
"""
