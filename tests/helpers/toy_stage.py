"""A test-only stage: a new stage is this one file, its method and nothing of the skeleton (runtime/loop.py has
that). It trains next-token prediction on the environment's questions, a language-modelling warm-up on prompts;
tests/stages/test_stage_contract.py holds it to the same crash-resume contract as the built-in stages."""

import itertools

from pydantic import Field

from posttrain.config import StageConfig
from posttrain.data.sft import env_examples
from posttrain.runtime.loop import StageLoop
from posttrain.stages import Cursor, register_stage
from posttrain.train.learner import Sequences
from posttrain.train.losses import SFTLoss


class PromptLMConfig(StageConfig):
    """Next-token loss on the environment's rendered questions."""

    steps: int = Field(2, gt=0, description="Optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Questions per step.")
    micro_batch_size: int = Field(4, gt=0, description="Questions per forward/backward.")


@register_stage("toy_prompt_lm", PromptLMConfig, state=Cursor)
def run(ctx, c, resume):
    loop = StageLoop(ctx, c, resume, steps=c.steps)
    cursor = resume.state.cursor if resume else 0
    parts = ctx.parts
    questions = itertools.islice(env_examples(parts.env, parts.tokenizer, seed=parts.seed, chat_template=False,
                                              max_len=parts.max_len), cursor, None)
    for _ in loop.steps():
        batch = [e.prompt for e in itertools.islice(questions, c.batch_size)]
        cursor += len(batch)
        result = loop.learner.train_step(Sequences([q[:1] for q in batch], [q[1:] for q in batch]),
                                         SFTLoss(sum(len(q) - 1 for q in batch)))
        loop.trained(result)
        loop.end_step({"toy/loss": result.loss}, Cursor(cursor))
    loop.end_stage(Cursor(cursor))
