"""One generate(): the registered model answers exactly as evaluation scored it."""

from __future__ import annotations

from tests.conftest import typed_eval_report


def test_the_registered_model_predicts_what_evaluation_scored(trained, registry_config) -> None:
    import mlflow

    from tasks.evaluate import evaluate_adapter
    from tasks.register import register_adapter
    from tasks.tracking import using_tracking_uri

    config, plan, splits, result = trained
    small = config.model_copy(deep=True)
    small.evaluation.max_rows = 12
    report = evaluate_adapter(small, plan, splits, result.adapter_dir)
    evaluated = report.outputs["adapter"]
    assert evaluated != report.outputs["base"], "the adapter must answer differently from the base"

    registry_config.registry.log_input_example = False
    outcome = register_adapter(registry_config, result.adapter_dir, typed_eval_report())
    # what a user of the registered model sends: the prompt text; the model applies the chat template
    examples = splits.eval[:small.evaluation.max_rows]
    assert all(len(e.prompt_messages) == 1 and e.prompt_messages[0]["role"] == "user" for e in examples)
    prompts = [e.prompt_messages[0]["content"] for e in examples]
    with using_tracking_uri(registry_config.registry.tracking_uri):
        served = mlflow.pyfunc.load_model(f"models:/{outcome.name}/{outcome.version}").predict(prompts)
    assert served == evaluated
