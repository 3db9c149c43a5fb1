"""The bodies of the posttrain commands, one module each, one layer under cli.py (which only parses flags):
eval.py (`posttrain eval`), distill_data.py (`posttrain distill-data`), diversity.py (`posttrain data diversity`
and `data select`), fit.py (`posttrain fit`); args.py holds what several of them parse the same way.

Commands may import any component package (envs, evals, models, rollout, data, ...); no component imports a
command, so the components stay free of cycles between them (tests/test_import_graph.py)."""
