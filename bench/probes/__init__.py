"""One-off measurements behind the numbers in bench/README.md, each run as ``python -m``.

They sit beside the product benchmark (``litefocus-bench``), not inside it: A/B of exported graphs
(``ab``), attention graph forms (``attention_forms``), ONNX Runtime memory and per-node profiles
(``ort_memory``, ``ort_profile``), Winograd convolutions (``winograd``) and an export's timing record
(``export_record``). Each writes its JSON to bench/results/.
"""
