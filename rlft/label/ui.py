"""Gradio labeling UI, mounted into the FastAPI app at ``/ui``.

The *Label* tab shows the prompt and the two responses side by side (their left/right order is randomised per
labeler and item by the server), buttons **A is better** / **Tie** / **B is better**, a 1–5 confidence choice, an
optional reasoning box and the labeler's progress. Keyboard shortcuts (ignored while typing in a text box): ``A``,
``B``, ``T`` vote; ``1``–``5`` set the confidence. The *Statistics* tab shows the quality report and win-rates.
Handlers call :mod:`rlft.label.store` directly (same process, same engine), with the same token checks as the API.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from rlft.label import queries, store
from rlft.label.export import format_win_rates, win_rates
from rlft.label.quality import format_report, quality_report

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a labeling server

import gradio as gr  # noqa: E402

SHORTCUTS_JS = """
<script>
document.addEventListener('keydown', (event) => {
  const el = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (el && (el.tagName === 'TEXTAREA' || (el.tagName === 'INPUT' && el.type !== 'radio'))) return;
  const key = event.key.toLowerCase();
  const buttons = {a: 'choose-a', b: 'choose-b', t: 'choose-tie'};
  if (buttons[key]) {
    const button = document.getElementById(buttons[key]);
    if (button) { event.preventDefault(); button.click(); }
  } else if ('12345'.includes(key) && key.length === 1) {
    const radio = document.querySelector('#confidence input[value="' + key + '"]');
    if (radio) { event.preventDefault(); radio.click(); }
  }
});
</script>
"""

CSS = """
.response-box { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 12px;
                min-height: 180px; background: var(--background-fill-secondary); }
#prompt { border-left: 4px solid var(--color-accent); padding-left: 12px; }
"""


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Chat messages as Markdown; the labeler mostly needs the last user turn, but earlier turns give context."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"**{m['role']}:** {m['content']}" for m in messages)


def _progress_text(engine: Engine, identity: store.Identity, note: str = "") -> str:
    prog = queries.progress(engine, identity.id)
    text = f"**{identity.name}** — labeled **{prog['done']}**, remaining **{prog['remaining']}**"
    return f"{text}  \n{note}" if note else text


def build_blocks(engine: Engine, *, lease_seconds: float = 600.0) -> gr.Blocks:
    """The Gradio app (not yet mounted)."""
    with gr.Blocks(title="rlft labeling", analytics_enabled=False) as demo:
        token_state = gr.State("")
        # Remembered in the browser (encrypted localStorage) so a page reload does not ask for the token again.
        saved_token = gr.BrowserState("", storage_key="rlft-label-token")
        task_state = gr.State(None)  # {"assignment_id": int, "shown": float}
        gr.Markdown("# rlft preference labeling")
        with gr.Tab("Label"):
            with gr.Row():
                token_box = gr.Textbox(label="Access token", type="password", elem_id="token", scale=4)
                start_btn = gr.Button("Start labeling", elem_id="start", scale=1)
            status = gr.Markdown("Enter the token you were given and press **Start labeling**.", elem_id="status")
            gr.Markdown("### Prompt")
            prompt_md = gr.Markdown(elem_id="prompt")
            with gr.Row(equal_height=True):
                with gr.Column():
                    gr.Markdown("### Response A")
                    resp_a = gr.Markdown(elem_id="response-a", elem_classes="response-box")
                with gr.Column():
                    gr.Markdown("### Response B")
                    resp_b = gr.Markdown(elem_id="response-b", elem_classes="response-box")
            confidence = gr.Radio(
                [1, 2, 3, 4, 5], value=3, label="Confidence (1 = guess, 5 = certain) — keys 1-5", elem_id="confidence"
            )
            reasoning = gr.Textbox(label="Reasoning (optional)", lines=2, elem_id="reasoning")
            with gr.Row():
                btn_a = gr.Button("A is better  [A]", variant="primary", elem_id="choose-a")
                btn_tie = gr.Button("Tie  [T]", elem_id="choose-tie")
                btn_b = gr.Button("B is better  [B]", variant="primary", elem_id="choose-b")
        with gr.Tab("Statistics"):
            with gr.Row():
                stats_token = gr.Textbox(label="Access token", type="password", elem_id="stats-token", scale=4)
                refresh_btn = gr.Button("Refresh statistics", elem_id="refresh-stats", scale=1)
            stats_md = gr.Markdown(elem_id="stats")

        view = [token_state, task_state, status, prompt_md, resp_a, resp_b, reasoning]

        def show_next(token: str, identity: store.Identity, note: str = "") -> list:
            task = store.claim_next(engine, identity.id, lease_seconds=lease_seconds)
            if task is None:
                done = "Nothing left to label — thank you!" + (f"  \n{note}" if note else "")
                return [token, None, _progress_text(engine, identity, done), "", "", "", ""]
            state = {"assignment_id": task.assignment_id, "shown": time.time()}
            return [
                token,
                state,
                _progress_text(engine, identity, note),
                render_prompt(task.prompt),
                task.response_a,
                task.response_b,
                "",
            ]

        def start(token: str) -> list:
            token = (token or "").strip()
            try:
                identity = store.authenticate(engine, token)
            except store.LabelError as exc:
                return ["", None, f"**Error:** {exc}", "", "", "", "", ""]
            return [*show_next(token, identity), token]

        def make_vote(choice: str):
            def vote(token: str, task: dict | None, conf: int, why: str) -> list:
                try:
                    identity = store.authenticate(engine, token)
                except store.LabelError as exc:
                    return ["", None, f"**Error:** {exc}", "", "", "", why]
                if not task:
                    return show_next(token, identity, "Press a button only when an example is shown.")
                try:
                    store.submit_preference(
                        engine,
                        identity.id,
                        task["assignment_id"],
                        choice,
                        confidence=int(conf or 3),
                        reasoning=(why or "").strip() or None,
                        time_spent_s=round(time.time() - task["shown"], 3),
                    )
                    note = ""
                except store.LabelError as exc:
                    note = f"**Not saved:** {exc}"
                return show_next(token, identity, note)

            return vote

        def refresh(token: str) -> str:
            try:
                store.authenticate(engine, (token or "").strip())
            except store.LabelError as exc:
                return f"**Error:** {exc}"
            votes = queries.load_votes(engine)
            report = format_report(quality_report(votes), queries.overview(engine))
            return f"{report}\n\n### Model win-rates\n\n{format_win_rates(win_rates(votes))}"

        def restore_token(saved: str):
            # Leave the boxes alone when nothing is saved: the labeler may already be typing into them.
            return (saved, saved) if saved else (gr.skip(), gr.skip())

        start_btn.click(start, [token_box], [*view, saved_token])
        token_box.submit(start, [token_box], [*view, saved_token])
        demo.load(restore_token, [saved_token], [token_box, stats_token])
        inputs = [token_state, task_state, confidence, reasoning]
        for button, choice in ((btn_a, "a"), (btn_b, "b"), (btn_tie, "tie")):
            button.click(make_vote(choice), inputs, view)
        refresh_btn.click(refresh, [stats_token], [stats_md])
        stats_token.submit(refresh, [stats_token], [stats_md])
    demo.queue(default_concurrency_limit=16)
    return demo


def mount_ui(app: FastAPI, engine: Engine, *, lease_seconds: float = 600.0, path: str = "/ui") -> FastAPI:
    """Mount the labeling UI into ``app`` at ``path``."""
    # System fonts only: the default theme would fetch Google Fonts, which an offline labeling server cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    blocks = build_blocks(engine, lease_seconds=lease_seconds)
    return gr.mount_gradio_app(app, blocks, path=path, theme=theme, css=CSS, head=SHORTCUTS_JS, footer_links=["api"])
