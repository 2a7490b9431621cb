"""chain_method: the reversible instance-method chaining behind GPUPrefetcher and AsyncProgressBarMetrics."""

from __future__ import annotations

from lightning_speedup._chain import chain_method


class Greeter:
    def greet(self) -> str:
        return "hello"


def test_chains_the_bound_method_and_restores_the_class_method() -> None:
    g = Greeter()
    undo = chain_method(g, "greet", lambda original: lambda: original() + "!")
    assert g.greet() == "hello!" and "greet" in vars(g)
    undo()
    assert "greet" not in vars(g) and g.greet() == "hello"


def test_restores_an_earlier_instance_attribute_and_leaves_a_later_chain_alone() -> None:
    g = Greeter()
    earlier = lambda: "hi"  # noqa: E731
    g.greet = earlier  # type: ignore[method-assign]
    undo = chain_method(g, "greet", lambda original: lambda: original() + "!")
    assert g.greet() == "hi!"
    undo()
    assert g.greet is earlier

    undo = chain_method(g, "greet", lambda original: lambda: original() + "!")
    later = chain_method(g, "greet", lambda original: lambda: original() + "?")
    undo()  # someone chained on top: theirs stays, and still calls ours
    assert g.greet() == "hi!?"
    later()
    assert g.greet() == "hi!"
