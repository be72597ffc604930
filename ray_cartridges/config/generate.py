"""Config of the teacher data generation stage (``ray-cartridges generate``). Seed key names stay valid."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import StrictModel

CPU_BLOCK = 32  # the smallest KV block vLLM's CPU attention takes; its block sizes are multiples of it


def check_cpu_block(block_size: int | None, alternatives: str) -> None:
    """Refuse a KV block size that vLLM's CPU attention cannot take (``alternatives``: what else the field takes)."""
    if isinstance(block_size, int) and block_size % CPU_BLOCK:
        raise ValueError(
            f"block_size {block_size}: vLLM's CPU attention takes blocks of a multiple of {CPU_BLOCK} tokens; use "
            f"one, {alternatives}"
        )


FAMILIES = ("structuring", "summarization", "question", "use_case", "creative")


class ReplayConfig(StrictModel):
    """Each Observation in memory becomes a user turn the teacher answers."""

    enabled: bool = Field(True, description="Generate replay prompts.")
    mode: Literal["exclude_current", "full_memory", "random_sampling", "focused"] = Field(
        "full_memory",
        description="Teacher context: the whole memory, the memory minus the current experience, random windows "
        "of other experiences, or (focused) a random window of window_k experiences that holds the current one "
        "(a small teacher reads a short context more reliably: better targets than its whole-memory answers).",
    )
    window_k: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        8,
        description="random_sampling / focused: experiences per window; auto: as many as hold window_tokens "
        "tokens of the memory's median experience, so that a window holds about as much text on any memory.",
    )
    window_tokens: int = Field(
        240, gt=0, description="window_k auto: the teacher tokens a window aims at (at least one experience)."
    )
    samples_per_observation: int = Field(
        1,
        gt=0,
        description="Prompts per Observation: the first asks it verbatim, the others in other words "
        "(and, for random_sampling / focused, over other windows); all share the Observation's split key.",
    )


class SelfStudyConfig(StrictModel):
    """The teacher, seeing a memory chunk, writes a question; then answers it with the memory (or the chunk) in context."""

    enabled: bool = Field(True, description="Generate self-study prompts.")
    num_samples: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Number of self-study conversations; auto: per_unit for each unit of the memory (experience or "
        "section), so coverage follows the memory's size.",
    )
    per_unit: float = Field(
        3.2, gt=0, description="Self-study conversations per unit of the memory when num_samples is auto."
    )
    families: list[Literal[FAMILIES]] = Field(list(FAMILIES), description="Seed-prompt families to draw from.")
    chunk_experiences: int = Field(
        6, gt=0, description="Experiences (in a corpus: sections, or paragraphs) shown to the question writer."
    )
    question_max_tokens: int = Field(64, gt=0, description="Max tokens of a generated question.")
    question_temperature: float = Field(0.8, ge=0, description="Sampling temperature of question writing.")
    answer_context: Literal["full_memory", "chunk"] = Field(
        "full_memory",
        description="What the teacher reads when it answers: the whole memory, or only the chunk the question "
        "was written from (as in the Cartridges paper's self-study; a small teacher answers from it more reliably).",
    )
    targets: Literal["answer_context", "full_memory"] = Field(
        "answer_context",
        description="Whose logprobs the cartridge learns for answers written from a chunk: the writing teacher's, or "
        "the teacher with the whole memory in context re-reading the same answer (the in-context model the "
        "cartridge replaces and `eval` measures against; one more prefill per answer).",
    )


class ReciteConfig(StrictModel):
    """The teacher reads one experience (or a few around it; in a corpus, a section) and states what it learned
    there: targets that carry the fact of every unit of the memory, also those whose questions are held out."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="Generate recital prompts. auto: on for a document corpus (it has no questions to replay, so "
        "recitals of its sections are what carry its facts), off for an agent's experiences (replayed instead).",
    )
    window_k: int = Field(1, gt=0, description="Experiences in the teacher's context, the recited one among them.")
    samples_per_experience: int = Field(
        1, gt=0, description="Prompts per experience, each with the next request of `requests` (cycling)."
    )
    answers: Literal["teacher", "text"] = Field(
        "teacher",
        description="teacher: the teacher writes each recital; text: the unit's own text is the answer and its "
        "targets are the teacher's logprobs reading that text with the unit in context (teacher forcing: a small "
        "teacher that cannot restate a passage faithfully still predicts each of its tokens).",
    )
    requests: list[str] | None = Field(
        None,
        min_length=1,
        description="User turns asking for what was learned; `{title}` is replaced by a corpus section's heading "
        "(default: the bundled RECITE_REQUESTS for experiences, chosen by how often the 135M teacher states the "
        "experience's Feedback; CORPUS_REQUESTS for a corpus, which ask about a section by name).",
    )


class QuizConfig(StrictModel):
    """The teacher writes questions about each sentence of the memory by continuing a few worked examples, then
    answers each with a window of the memory around the sentence: questions about every fact, in other words
    than the memory's own."""

    enabled: bool = Field(
        True,
        description="Generate quiz prompts (questions in other words than the memory's: held-out-phrasing recall).",
    )
    questions_per_sentence: int = Field(
        2, gt=0, description="Questions written per distinct sentence of the memory (each sampled on its own)."
    )
    temperature: float = Field(
        0.8, ge=0, description="Sampling temperature of question writing (above 0: varied questions per sentence)."
    )
    window_k: int = Field(
        1,
        gt=0,
        description="Experiences (in a corpus: sections) the answering teacher reads, the sentence's among them "
        "(1: the small teacher states the sentence most often when it reads little else).",
    )
    min_chars: int = Field(
        20, gt=0, description="Shortest sentence asked about (shorter ones are replies such as 'Thanks!')."
    )
    answers: Literal["auto", "teacher", "text"] = Field(
        "auto",
        description="teacher: the teacher answers each question; text: the sentence asked about is the answer, its "
        "targets the teacher's logprobs reading it with the window in context (teacher forcing: every question "
        "gets an answer that states its fact). auto: text for a document corpus (all statements, which a small "
        "teacher misstates), teacher for an agent's experiences (whose sentences include questions).",
    )


class GeneralConfig(StrictModel):
    """Unrelated requests answered by the bare teacher (no memory): the cartridge learns to leave such answers as they were."""

    num_samples: int = Field(0, ge=0, description="Number of unrelated requests answered without memory (0: none).")
    requests_file: str | None = Field(
        None, description="Text file, one request per line (default: the bundled data/general_requests.txt)."
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Max answer tokens of these requests (None: generate.max_tokens). Longer than the memory's "
        "short answers, they teach the cartridge to leave longer text alone too.",
    )


class GenerateConfig(StrictModel):
    """Teacher generation: a model with the memory in its prompt answers many prompts; top-k logprobs are kept."""

    checkpoint_dir: str = Field(description="HistoryAgent checkpoint root, 'latest', an ep_* dir, or a text file.")
    output_dir: str = Field("outputs/distillation/data/example_run", description="Where dataset files go.")
    model_name: str = Field("smollm2-135m-instruct", description="Teacher model: hub id, local dir or bundled name.")
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="Teacher engine: vLLM (production) or transformers (reference/fallback)."
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Teacher dtype. auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, fp32 elsewhere "
        "(CPUs without them emulate bf16, much slower than fp32).",
    )
    top_logprobs: int = Field(20, gt=0, description="Top-k logprobs kept per answer token (= training top_k_logits).")
    min_prob_mass: float = Field(0.99, gt=0, le=1, description="Parquet shards keep top tokens until this mass.")
    num_threads: int = Field(1, gt=0, description="Teacher actors (engines) in parallel.")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per teacher actor (CPU engine).")
    shard_size: int = Field(
        64,
        gt=0,
        description="Prompts per shard (unit of batching, writing and resuming): a bigger shard fills each engine "
        "call's batch, which decodes faster per answer; a smaller one loses less to an interruption.",
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of answers.")
    max_tokens: int = Field(128, gt=0, description="Max answer tokens.")
    max_model_len: int | None = Field(
        None,
        gt=0,
        description="Engine context length; unset: fitted to the longest teacher request (memory, question and "
        "answer), at least 4096 and at most the model's context. A request that does not fit is an error.",
    )
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine.")
    enforce_eager: bool = Field(
        False,
        description="vLLM without torch.compile (and without CUDA graphs on GPUs): the engine starts faster but "
        "prefills long prompts slower; for short runs and tests.",
    )
    block_size: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description="Tokens per block of vLLM's KV cache, the unit in which its prefix cache reuses a prompt's "
        "start. auto: 32 on CPUs (the smallest block vLLM's CPU attention takes: its default of 128 reuses "
        "nothing of a shared start shorter than 128 tokens) and vLLM's own choice on GPUs; null: vLLM's choice.",
    )
    deterministic: bool = Field(
        False,
        description="Bit-reproducible teacher outputs on GPUs: vLLM's engine runs in the actor's own process, so "
        "which requests share a step never depends on timing (slower there). Without it, bf16 answers of two fresh "
        "runs may differ in a few tokens; a re-run keeps the shards written first either way. A CPU teacher always "
        "runs in the actor's process (it starts sooner so).",
    )
    score_engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="What reads the answers whose targets come from another teacher than the one that wrote them "
        "(self_study.targets: full_memory): vLLM (its prompt logprobs: every answer re-reads the whole memory, "
        "as prompt logprobs skip vLLM's prefix cache) or transformers (the same model beside the vLLM engine, the "
        "memory's KV read once and reused: cheaper on CPUs). auto: transformers on CPU, vLLM on GPUs; with "
        "engine: transformers always transformers (vllm is refused there).",
    )
    use_gpu: bool = Field(False, description="Run teacher actors on GPUs (num_gpus = tensor_parallel_size).")
    max_samples: int | None = Field(None, gt=0, description="Cap on generated conversations.")
    seed: int = Field(0, description="Seed of prompt sampling and generation.")
    strict: bool = Field(False, description="Fail on malformed memory lines instead of skipping and counting them.")
    student_system_prompt: str | None = Field(None, description="System prompt of the student conversation.")
    memory_layout: Literal["system", "history_lines", "history_chat"] = Field(
        "system",
        description="How the teacher reads the memory: 'system' puts instructions and experiences in one system "
        "prompt (history_template); 'history_lines' and 'history_chat' are the research workflow's HistoryAgent "
        "prompts (its first version's 'TYPE: content' lines and 'Q:' in one user turn; its later one's chat turns).",
    )
    history_instructions: str | None = Field(None, description="Override of the memory instructions in the prompt.")
    history_template: str | None = Field(
        None, description="Override of the prompt template ({system_prompt}, {instructions}, {experiences})."
    )
    replay: ReplayConfig = ReplayConfig()
    self_study: SelfStudyConfig = SelfStudyConfig()
    recite: ReciteConfig = ReciteConfig()
    quiz: QuizConfig = QuizConfig()
    general: GeneralConfig = GeneralConfig()
    training_top_k: int | None = Field(None, gt=0, description="top_k_logits of the training run (mismatch warns).")
    hf_repo_id: str | None = Field(None, description="Hub dataset repo to push to.")
    hf_private: bool = Field(True, description="Create the hub dataset as private.")

    @property
    def vllm_on_cpu(self) -> bool:
        """The teacher is a vLLM engine on CPU, whose attention decides which KV block sizes work."""
        return self.engine == "vllm" and not self.use_gpu

    @property
    def engine_in_process(self) -> bool:
        """vLLM's engine runs in the teacher actor's own process: asked for (deterministic), and always on CPU."""
        return self.deterministic or self.vllm_on_cpu

    @model_validator(mode="after")
    def _check(self):
        if not (
            self.replay.enabled
            or self.recite.enabled is not False
            or self.quiz.enabled
            or (self.self_study.enabled and self.self_study.num_samples)
        ):
            raise ValueError("nothing to generate: enable replay, recite, quiz or self_study")
        if self.score_engine == "vllm" and self.engine != "vllm":
            raise ValueError(
                f"score_engine 'vllm' needs engine 'vllm' (engine is {self.engine!r}: no vLLM engine is started to "
                "score with); use score_engine 'auto' or 'transformers'"
            )
        if self.vllm_on_cpu:
            check_cpu_block(self.block_size, "'auto' or null")
        return self
