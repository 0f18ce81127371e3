"""What routing sees of a request: rendered prompt text and the session key."""

from __future__ import annotations

from array import array

from moriio_proxy.policies import EMPTY, RoutingContext, routing_context
from moriio_proxy.policies.context import prompt_text, render_messages, session_key
from moriio_proxy.protocol import parse_client_request

SYSTEM = {"role": "system", "content": "You are terse."}


def chat(messages, **extra):
    return parse_client_request("chat", {"model": "m", "messages": messages, **extra})


def completion(prompt, **extra):
    return parse_client_request("completions", {"model": "m", "prompt": prompt, **extra})


def test_the_next_turn_of_a_conversation_starts_with_this_turns_rendering():
    turn1 = [SYSTEM, {"role": "user", "content": "Name a prime."}]
    turn2 = [*turn1, {"role": "assistant", "content": "7"}, {"role": "user", "content": "More"}]
    turn3 = [*turn2, {"role": "assistant", "content": "11"}, {"role": "user", "content": "?"}]
    r1, r2, r3 = (render_messages(t) for t in (turn1, turn2, turn3))
    assert r2.startswith(r1) and r3.startswith(r2)
    assert len(r1) < len(r2) < len(r3)


def test_rendering_keeps_roles_and_message_boundaries_apart():
    one = render_messages([{"role": "user", "content": "ab"}])
    two = render_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    as_system = render_messages([{"role": "system", "content": "ab"}])
    assert len({one, two, as_system}) == 3
    assert "ab" in one and "user" in one


def test_content_parts_render_their_text_and_other_parts_by_value():
    parts = [{"type": "text", "text": "look at "}, {"type": "text", "text": "this"}]
    assert render_messages([{"role": "user", "content": parts}]) == render_messages(
        [{"role": "user", "content": "look at this"}]
    )
    cat = [{"type": "image_url", "image_url": {"url": "data:cat"}}]
    dog = [{"type": "image_url", "image_url": {"url": "data:dog"}}]
    rendered = {render_messages([{"role": "user", "content": c}]) for c in (cat, dog)}
    assert len(rendered) == 2


def test_tool_calls_and_odd_messages_render_without_error():
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        "not a message",
        {"role": "user", "content": {"odd": True}},
    ]
    rendered = render_messages(messages)
    assert '"id":"1"' in rendered and "42" in rendered and "not a message" in rendered


def test_chat_text_leads_with_the_tools():
    messages = [{"role": "user", "content": "hi"}]
    plain = prompt_text(chat(messages))
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = prompt_text(chat(messages, tools=tools))
    assert isinstance(plain, str) and isinstance(with_tools, str)
    assert with_tools.endswith(plain) and with_tools != plain


def test_completion_prompts():
    assert prompt_text(completion("once upon a time")) == "once upon a time"
    assert prompt_text(completion(["once"])) == "once"
    assert prompt_text(completion([1, 2, 3])) == array("I", [1, 2, 3]).tobytes()
    assert prompt_text(completion([[5, 6]])) == array("I", [5, 6]).tobytes()
    assert prompt_text(completion([-1, 2])) is None  # not token ids: nothing to match


def test_session_key_prefers_the_header_then_the_user_field():
    assert session_key({"user": "alice"}, "conv-9") == "conv-9"
    assert session_key({"user": "alice"}, None) == "alice"
    assert session_key({"user": "alice"}, "  ") == "alice"
    assert session_key({"user": ""}, None) is None
    assert session_key({"user": 7}, None) is None
    assert session_key({}, None) is None


def test_only_what_the_policies_read_is_built():
    request = chat([{"role": "user", "content": "hi"}], user="alice")
    assert routing_context(request, "s1", ()) is EMPTY
    assert routing_context(request, "s1", {"session"}) == RoutingContext(None, "s1")
    only_text = routing_context(request, "s1", {"text"})
    assert only_text.session is None and only_text.text == render_messages(
        [{"role": "user", "content": "hi"}]
    )
    both = routing_context(request, None, {"text", "session"})
    assert both.text and both.session == "alice"
