"""The paper's baselines that are not PMET variants: ROME (rank-one, sequential) and FT-W (constrained
fine-tuning). MEMIT is a PMET variant (`config.MEMIT_OVERRIDES`) and runs through `pmet.editor.edit`."""
