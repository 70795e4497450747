"""fmx.adapters — fmx episodes in the shapes RL trainers expect.

Thin wrappers over fmx.Client (no logic of their own beyond bookkeeping):

- `trl_environment(addr)`: a class for TRL's `GRPOTrainer(environment_factory=...)`.
  TRL makes one instance per rollout with no arguments, calls `reset(**row)`
  with the dataset row and appends the string it returns to the prompt, and
  exposes every public method but `reset` as a tool, described by its type
  hints and its docstring's `Args:`; reward functions get the instances as
  `environments`. `trl_dataset(addr)` makes the rows (one per task) and
  `trl_reward` reads the rewards.
- `FmxToolEnv` / `verifiers_environment(addr)`: a verifiers-style stateful
  tool environment (PrimeIntellect verifiers' `StatefulToolEnv` contract):
  `setup_state(state)` opens the episode, `update_tool_args(...)` injects the
  episode id the model never sees (the tools' `episode` argument, skipped in
  their schemas), `is_completed(messages, state)`, and `reward(completion,
  state)` for a Rubric. With verifiers installed, `verifiers_environment`
  returns a real `vf.StatefulToolEnv` subclass.
- `GymEnv`: a Gymnasium-style `Env` with text observations: `reset(seed=,
  options=) -> (obs, info)`, `step(action) -> (obs, reward, terminated,
  truncated, info)`, where an action is `{"tool": NAME, "args": {...}}` or its
  JSON text. A subclass of `gymnasium.Env` when gymnasium is installed.

An episode the policy leaves open is graded when its reward is read: it is
closed with `grade=True` (the last code verify_component compiled for the
task's module is graded as if submitted). None of TRL, verifiers or
Gymnasium is a dependency: the adapters follow their documented contracts
and are tested the way those libraries drive them (tests/python/test_trainer.py).
Not here: the protocol (fmx.client), the server.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .client import DEFAULT_ADDR, Client, EpisodeOver, FmxError

# ---- shared pieces ----

_CLIENTS: Dict[str, Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(addr: str, timeout: Optional[float]) -> Client:
    """One thread-safe client per address for all environments of a process."""
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(addr)
        if c is None:
            c = _CLIENTS[addr] = Client(addr, timeout=timeout)
        return c


def _text(obs: Mapping[str, Any]) -> str:
    return str(obs.get("text", ""))


class _Episode:
    """One episode's bookkeeping: id, done, reward."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.id: Optional[int] = None
        self.done = True
        self.reward = 0.0
        self.info: Dict[str, Any] = {}

    def open(self, task: Optional[str], policy: str, seed: Optional[int],
             max_steps: Optional[int]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        self.abandon()
        obs, info = self.client.reset(task=task, policy=policy, seed=seed, max_steps=max_steps)
        self.id, self.done, self.reward, self.info = info["episode"], False, 0.0, info
        return obs, info

    def step(self, tool: str, args: Mapping[str, Any]
             ) -> Tuple[Dict[str, Any], float, bool, bool, Dict[str, Any]]:
        if self.id is None:
            raise RuntimeError("no episode: call reset first")
        obs, reward, terminated, truncated, info = self.client.step(
            {"tool": tool, "args": dict(args)}, self.id)
        if terminated or truncated:
            self.done, self.reward = True, reward
        return obs, reward, terminated, truncated, info

    def call(self, tool: str, args: Mapping[str, Any]) -> str:
        """A tool call as text, for an LLM: the observation, or why there is none."""
        if self.done:
            return f"The episode is over (reward {self.reward:.4f}); no more tool calls."
        try:
            obs, reward, terminated, truncated, _ = self.step(
                tool, {k: v for k, v in args.items() if v is not None})
        except EpisodeOver as e:
            self.done = True
            return f"The episode is over: {e.message}"
        text = _text(obs)
        if terminated or truncated:
            text += f"\n\nThe episode is over; reward {reward:.4f}."
        return text

    def final_reward(self) -> float:
        """The reward; an episode still open is graded first (close with grade)."""
        if not self.done and self.id is not None:
            try:
                reply = self.client.close(self.id, grade=True)
                self.reward = float(reply.get("reward", 0.0))
            except FmxError:
                self.reward = 0.0
            self.done = True
        return self.reward

    def abandon(self) -> None:
        """Closes an episode still open without grading it (logged aborted)."""
        if not self.done and self.id is not None:
            try:
                self.client.close(self.id)
            except FmxError:
                pass
        self.done = True


def task_rows(client: Client) -> List[Dict[str, Any]]:
    """One row per task: {task, goal, system}: the prompt a trainer shows for it."""
    system = client.spec()["system_prompt"]
    return [{"task": t["id"], "goal": t["goal"], "system": system}
            for t in client.list_tasks(goals=True)]


# ---- TRL: GRPOTrainer(environment_factory=...) ----

class TRLEnvironment:
    """One fmx episode per instance, its tools as methods (TRL's environment_factory).

    Subclasses made by `trl_environment` set ADDR, POLICY and MAX_STEPS; the
    constructor takes no arguments, as TRL requires.
    """

    ADDR = DEFAULT_ADDR
    POLICY = "trl"
    MAX_STEPS: Optional[int] = None
    TIMEOUT: Optional[float] = 600.0

    def __init__(self) -> None:
        self._episode = _Episode(_shared_client(self.ADDR, self.TIMEOUT))

    def reset(self, **row: Any) -> str:
        """Starts the episode of the row's `task` (round robin without one); returns the goal.

        Extra row fields (prompt, ...) are ignored; `seed` is recorded if given."""
        seed = row.get("seed")
        obs, _ = self._episode.open(row.get("task"), self.POLICY,
                                    int(seed) if isinstance(seed, int) else None, self.MAX_STEPS)
        return _text(obs)

    def read_module_source(self, path: str = "", mode: str = "full") -> str:
        """Read the Python source of a module's class, with how often each line ran.

        Args:
            path: Module path as in named_modules(), e.g. "model.layers.0.mlp"; "" is the task's module.
            mode: "full" for every line, "live" for only the lines that ran on the probes.
        """
        return self._episode.call("read_module_source", {"path": path or None, "mode": mode})

    def get_weight_info(self, path: str = "") -> str:
        """List the parameters and buffers a module sees: names relative to it, shapes, dtypes, ties.

        Args:
            path: Module path as in named_modules(); "" is the task's module.
        """
        return self._episode.call("get_weight_info", {"path": path or None})

    def capture_intermediate(self, probe: str, path: str = "", call: int = 0,
                             values: bool = False) -> str:
        """Show one call's inputs and outputs of a module on a visible probe.

        Args:
            probe: A visible probe's name, e.g. "p0".
            path: Module path as in named_modules(); "" is the task's module.
            call: Which call of the module on that probe, 0 for the first.
            values: Also return the tensor values (at most 4096 per tensor).
        """
        return self._episode.call("capture_intermediate", {"path": path or None, "probe": probe,
                                                           "call": call, "values": values})

    def trace_ops(self, path: str = "") -> str:
        """List the PyTorch ops that ran inside a module, in order, with shapes and dataflow.

        Args:
            path: Module path as in named_modules(); "" is the task's module.
        """
        return self._episode.call("trace_ops", {"path": path or None})

    def verify_component(self, code: str, path: str = "", entry: str = "forward") -> str:
        """Run your functional code on the visible probes and compare it with the module.

        Args:
            code: A complete Python file in the fmx candidate language.
            path: Module path the code implements; "" is the task's module.
            entry: Name of the function to call.
        """
        return self._episode.call("verify_component",
                                  {"path": path or None, "code": code, "entry": entry})

    def submit(self, code: str, entry: str = "forward") -> str:
        """Submit the final code for the task's module; grades it on every probe and ends the episode.

        Args:
            code: A complete Python file in the fmx candidate language.
            entry: Name of the function to call.
        """
        return self._episode.call("submit", {"code": code, "entry": entry})

    def finish(self) -> str:
        """End the episode: the last code verify_component compiled for the task's module is graded."""
        return self._episode.call("finish", {})

    def _reward(self) -> float:
        return self._episode.final_reward()


def trl_environment(addr: str = DEFAULT_ADDR, policy: str = "trl",
                    max_steps: Optional[int] = None) -> type:
    """A TRLEnvironment class bound to a server, for GRPOTrainer(environment_factory=...)."""
    return type("FmxTRLEnvironment", (TRLEnvironment,),
                {"ADDR": addr, "POLICY": policy, "MAX_STEPS": max_steps})


def trl_dataset(addr: str = DEFAULT_ADDR, repeat: int = 1) -> List[Dict[str, Any]]:
    """Rows for GRPOTrainer's train_dataset: {"prompt": [system, user], "task"}, each task
    `repeat` times. reset appends the goal to the user message."""
    rows = task_rows(_shared_client(addr, TRLEnvironment.TIMEOUT))
    return [{"prompt": [{"role": "system", "content": r["system"]},
                        {"role": "user", "content": f"Task {r['task']}."}],
             "task": r["task"]} for r in rows for _ in range(repeat)]


def trl_reward(environments: List[TRLEnvironment], **kwargs: Any) -> List[float]:
    """A TRL reward function: each rollout's episode reward (open episodes graded first)."""
    return [env._reward() for env in environments]


# ---- verifiers: a stateful tool environment ----

class FmxToolEnv:
    """verifiers' StatefulToolEnv contract over fmx (usable without verifiers).

    `tools`: the fmx tools as functions whose `episode` argument is injected
    by update_tool_args (`skipped_args` lists it per tool, as add_tool's
    args_to_skip). State keys: `fmx_episode` (the open episode's bookkeeping).
    """

    skipped_args = ["episode"]

    def __init__(self, addr: str = DEFAULT_ADDR, policy: str = "verifiers",
                 max_steps: Optional[int] = None, timeout: Optional[float] = 600.0) -> None:
        self.client = _shared_client(addr, timeout)
        self.policy = policy
        self.max_steps = max_steps
        self.tools: List[Callable[..., str]] = [self._tool(t["function"]["name"])
                                               for t in self.client.spec()["tools"]]

    def _tool(self, name: str) -> Callable[..., str]:
        def tool(episode: _Episode, **args: Any) -> str:
            return episode.call(name, args)
        tool.__name__ = name
        return tool

    def oai_tools(self) -> List[Dict[str, Any]]:
        """The tools' schemas as the model sees them (strict mode; no `episode`)."""
        return self.client.spec()["tools_strict"]

    def dataset(self) -> List[Dict[str, Any]]:
        """Rows {prompt: [system, user goal], info: {task}}, one per task."""
        return [{"prompt": [{"role": "system", "content": r["system"]},
                            {"role": "user", "content": r["goal"]}],
                 "info": {"task": r["task"]}} for r in task_rows(self.client)]

    async def setup_state(self, state: Dict[str, Any], **kwargs: Any) -> Dict[str, Any]:
        """Opens the episode of state["info"]["task"]."""
        episode = _Episode(self.client)
        episode.open((state.get("info") or {}).get("task"), self.policy, None, self.max_steps)
        state["fmx_episode"] = episode
        return state

    def update_tool_args(self, tool_name: str, tool_args: Dict[str, Any], messages: Any,
                         state: Dict[str, Any], **kwargs: Any) -> Dict[str, Any]:
        return dict(tool_args, episode=state["fmx_episode"])

    async def is_completed(self, messages: Any, state: Dict[str, Any], **kwargs: Any) -> bool:
        return state["fmx_episode"].done

    def reward(self, completion: Any, state: Dict[str, Any], **kwargs: Any) -> float:
        """A Rubric reward function: the episode's reward (an open one graded first)."""
        return state["fmx_episode"].final_reward()


def verifiers_environment(addr: str = DEFAULT_ADDR, **kwargs: Any) -> Any:
    """With verifiers installed, a vf.StatefulToolEnv over fmx (dataset, tools, rubric);
    without it, an FmxToolEnv."""
    try:
        import verifiers as vf  # type: ignore[import-not-found]
    except ImportError:
        return FmxToolEnv(addr, **kwargs)

    fmx_env = FmxToolEnv(addr, **kwargs)

    class _VfEnv(vf.StatefulToolEnv):  # type: ignore[misc,valid-type]
        async def setup_state(self, state: Any, **kw: Any) -> Any:
            return await fmx_env.setup_state(state, **kw)

        def update_tool_args(self, *a: Any, **kw: Any) -> Dict[str, Any]:
            return fmx_env.update_tool_args(*a, **kw)

        async def is_completed(self, messages: Any, state: Any, **kw: Any) -> bool:
            return await fmx_env.is_completed(messages, state, **kw)

    from datasets import Dataset  # type: ignore[import-not-found]
    env = _VfEnv(dataset=Dataset.from_list(fmx_env.dataset()),
                 rubric=vf.Rubric(funcs=[fmx_env.reward]), max_turns=fmx_env.max_steps or 40)
    for tool in fmx_env.tools:
        env.add_tool(tool, args_to_skip=FmxToolEnv.skipped_args)
    return env


# ---- Gymnasium ----

try:
    import gymnasium as _gym  # type: ignore[import-not-found]
    _EnvBase: type = _gym.Env
except ImportError:
    _gym = None
    _EnvBase = object


class GymEnv(_EnvBase):  # type: ignore[misc,valid-type]
    """A Gymnasium-style Env: text observations, tool-call actions.

    task: the task of every episode (None: the server's round robin; reset's
    options={"task": ID} picks one per episode). Observations are the
    observation texts; info holds the structured observation (`observation`)
    and the server's info. An action that is not a tool call (bad JSON, no
    tool) gets an error text and costs no step.
    """

    metadata: Dict[str, Any] = {"render_modes": []}
    render_mode = None

    def __init__(self, addr: str = DEFAULT_ADDR, task: Optional[str] = None,
                 policy: str = "gym", max_steps: Optional[int] = None,
                 timeout: Optional[float] = 600.0) -> None:
        self.task = task
        self.policy = policy
        self.max_steps = max_steps
        self._episode = _Episode(_shared_client(addr, timeout))
        if _gym is not None:
            self.observation_space = _gym.spaces.Text(max_length=1 << 20)
            self.action_space = _gym.spaces.Text(max_length=1 << 20)

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None
              ) -> Tuple[str, Dict[str, Any]]:
        task = (options or {}).get("task", self.task)
        obs, info = self._episode.open(task, self.policy, seed, self.max_steps)
        return _text(obs), dict(info, observation=obs)

    def step(self, action: Union[str, Mapping[str, Any]]
             ) -> Tuple[str, float, bool, bool, Dict[str, Any]]:
        if self._episode.done:
            raise RuntimeError("step after the episode ended: call reset")
        if isinstance(action, str):
            try:
                action = json.loads(action)
            except json.JSONDecodeError as e:
                return (f"Not an action: {e}. An action is {{\"tool\": NAME, \"args\": {{...}}}}.",
                        0.0, False, False, {"error": "bad_action"})
        if not isinstance(action, Mapping) or not isinstance(action.get("tool"), str):
            return ("Not an action: it needs \"tool\" (a string) and \"args\" (a map).",
                    0.0, False, False, {"error": "bad_action"})
        obs, reward, terminated, truncated, info = self._episode.step(
            action["tool"], action.get("args") or {})
        return _text(obs), reward, terminated, truncated, dict(info, observation=obs)

    def close(self) -> None:
        """Closes an episode still open (logged aborted)."""
        self._episode.abandon()
