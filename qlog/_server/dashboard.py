"""The dashboard at ``/``: server-rendered HTML, readable and usable with
JavaScript off, loading nothing from the internet (inline CSS and JS only;
the Content-Security-Policy says so to the browser).

Pages: the queues (``/``), one queue (``/dashboard/queues/{name}``: its
counts, settings, actions and a browser of its messages by peek, with
dead-letter redrive and delete), the purge confirmation
(``/dashboard/queues/{name}/purge``).  With JavaScript on, the counts and the
rate graphs are redrawn from ``/dashboard/api/stats`` every 2 seconds.

Rates in and out come from samples of each queue's counters (``sent``;
``acked + dead_lettered + deleted + expired``) kept in memory, at most one
per SAMPLE_EVERY seconds, taken when a page or the JSON is asked for.

Every POST carries ``form_digest(token)`` (``app.py``) in ``_digest`` and is
refused without it; it answers with a 303 back to the page, with what
happened (``?msg=``) or what went wrong (``?err=``).
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import secrets
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import errors
from .._message import Message
from .._queue import Broker, Queue, QueueStats
from .._settings import MAX_PULL_BATCH
from .api import Api, ApiError
from .app import COOKIE, form_digest

SAMPLE_EVERY = 0.5
"""Seconds between two samples of a queue's counters, at least."""
HISTORY = 150
"""Samples kept per queue (the graphs' width)."""
BODY_SHOWN = 4096
"""Characters (or bytes, base64'd) of a body the message browser shows."""
PEEK_DEFAULT = 25
SPARK_W, SPARK_H = 100, 24

Form = Dict[str, List[str]]

_STYLE = """
:root{--fg:#1d2330;--mut:#667085;--bg:#f6f7f9;--card:#fff;--line:#e4e7ec;--acc:#2457d6;--bad:#c0362c;
--ok:#137a4b;--warn:#b25e09}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:var(--fg);background:var(--bg)}
header{display:flex;gap:1.2em;align-items:center;padding:.6em 1.5em;background:#1d2330;color:#fff}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700;font-size:1.1em;letter-spacing:.02em}
header .sp{flex:1}header .mut{color:#aab2c0}
main{padding:1.2em 1.5em;max-width:1280px}
h1{font-size:1.35em;margin:.2em 0 .6em}h2{font-size:1.05em;margin:1.4em 0 .5em}
a{color:var(--acc)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.8em 1em;margin:0 0 1em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:1em}
.grid .card{margin:0}.card h2{margin-top:0}
table.queues td:first-child{width:28%}table.stats{width:auto;min-width:60%}
table{border-collapse:collapse;width:100%;background:var(--card)}
th,td{padding:.45em .7em;border-bottom:1px solid var(--line);text-align:right;vertical-align:top;white-space:nowrap}
th{font-weight:600;color:var(--mut);font-size:.85em;text-transform:uppercase;letter-spacing:.03em}
th.l,td.l{text-align:left}td.body{white-space:normal;text-align:left;width:50%}
.tbl{border:1px solid var(--line);border-radius:8px;overflow:auto;margin-bottom:1em}
.tbl tr:last-child td{border-bottom:0}.tbl.fit{display:inline-block;max-width:100%}
.num{font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;
max-height:16em;overflow:auto}
.mut{color:var(--mut)}.small{font-size:.85em}
.pill{display:inline-block;padding:.05em .6em;border-radius:99px;font-size:.8em;font-weight:600;
background:#e3f4ea;color:var(--ok)}
.pill[data-v=paused]{background:#fdeedc;color:var(--warn)}
.live{font-size:.8em;padding:.1em .6em;border-radius:99px;background:#3a4253;color:#cfd5df}
.live[data-v=on]{background:#1f6f48;color:#fff}.live[data-v=off]{background:#8a2b24;color:#fff}
.flash{padding:.6em 1em;border-radius:8px;margin:0 0 1em;border:1px solid}
.flash.ok{background:#e9f7ef;border-color:#b6e2c8;color:#0d5c38}
.flash.err{background:#fdecea;border-color:#f3b8b1;color:#8f2119;font-weight:600}
form.inline{display:inline}
button,.btn{font:inherit;padding:.35em .9em;border-radius:6px;border:1px solid #b8c0cc;background:#fff;
color:var(--fg);cursor:pointer;text-decoration:none;display:inline-block}
button:hover,.btn:hover{border-color:var(--acc)}
button.primary{background:var(--acc);border-color:var(--acc);color:#fff}
button.danger,.btn.danger{border-color:#e3a59f;color:var(--bad)}
button.danger.solid{background:var(--bad);color:#fff;border-color:var(--bad)}
input[type=text],input[type=password],input[type=number],select,textarea{font:inherit;padding:.35em .5em;
border:1px solid #b8c0cc;border-radius:6px;background:#fff;color:var(--fg)}
textarea{width:100%;font:12px/1.4 ui-monospace,monospace;min-height:6em}
label{display:block;margin:.3em 0}
.row{display:flex;gap:.6em;align-items:center;flex-wrap:wrap}
svg.spark{vertical-align:middle}svg.spark polyline{fill:none;stroke-width:1.5}
svg.spark line{stroke:var(--line);stroke-width:1}
.in polyline{stroke:#2457d6}.out polyline{stroke:#13915a}
.rate{display:inline-block;min-width:4.5em;text-align:right;font-size:.85em}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}dl.kv dt{color:var(--mut)}
dl.kv dd{margin:0}
.login{max-width:24em;margin:12vh auto}
"""

_SCRIPT = """(()=>{const live=document.getElementById('live');if(!live||!window.fetch)return;
const W=%d,H=%d;
function pts(v){if(!v.length)return'';const m=Math.max(...v)||1,dx=v.length>1?W/(v.length-1):0;
return v.map((x,i)=>(i*dx).toFixed(1)+','+(H-2-(x/m)*(H-4)).toFixed(1)).join(' ')}
async function tick(){let d;try{const r=await fetch(live.dataset.src,{credentials:'same-origin',cache:'no-store'});
if(!r.ok)throw new Error('HTTP '+r.status);d=await r.json()}catch(e){live.textContent='offline';live.dataset.v='off';return}
live.textContent='live';live.dataset.v='on';
const names=d.queues.map(q=>q.name).join(',');
if(live.dataset.names!==undefined&&live.dataset.names!==names){location.reload();return}
for(const row of document.querySelectorAll('[data-queue]')){const q=d.queues.find(x=>x.name===row.dataset.queue);
if(!q)continue;for(const c of row.querySelectorAll('[data-k]')){const k=c.dataset.k;
if(k==='in'||k==='out'){const v=q['rate_'+k];c.querySelector('polyline').setAttribute('points',pts(v));
c.querySelector('.rate').textContent=q.text[k]}else if(k in q.text){c.textContent=q.text[k];c.dataset.v=q.text[k]}}}}
for(const a of document.querySelectorAll('[data-all]')){a.hidden=false;a.addEventListener('change',()=>{
for(const b of document.querySelectorAll('input[name=id]'))b.checked=a.checked})}
tick();setInterval(tick,2000)})();""" % (SPARK_W, SPARK_H)


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _q(name: str) -> str:
    return quote(name, safe="")


def _queue_url(name: str) -> str:
    return f"/dashboard/queues/{_q(name)}"


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def _since(when: datetime) -> str:
    return _age((datetime.now(timezone.utc) - when).total_seconds()) + " ago"


def _rate(r: Optional[float]) -> str:
    if r is None:
        return "–"
    if r == 0:
        return "0/s"
    return f"{r:.1f}/s" if r < 100 else f"{r:.0f}/s"


def _points(values: Sequence[float]) -> str:
    """The sparkline's polyline, as the page's script draws it too."""
    if not values:
        return ""
    top = max(values) or 1.0
    dx = SPARK_W / (len(values) - 1) if len(values) > 1 else 0.0
    return " ".join(f"{i * dx:.1f},{SPARK_H - 2 - (v / top) * (SPARK_H - 4):.1f}" for i, v in enumerate(values))


def _spark(kind: str, values: Sequence[float]) -> str:
    last = values[-1] if values else None
    return (f"<span data-k='{kind}' class='{kind}'><svg class='spark' width='{SPARK_W}' height='{SPARK_H}' "
            f"viewBox='0 0 {SPARK_W} {SPARK_H}' role='img' aria-label='rate {kind}'>"
            f"<line x1='0' y1='{SPARK_H - 1.5}' x2='{SPARK_W}' y2='{SPARK_H - 1.5}'/>"
            f"<polyline points='{_points(values)}'/></svg> <span class='rate num'>{_rate(last)}</span></span>")





def _body(m: Message) -> str:
    raw = m.raw_body
    ct = m.content_type
    if ct in ("json", "text"):
        text = raw.decode("utf-8", "replace")
        if ct == "json":
            try:
                text = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
            except (ValueError, RecursionError):
                pass
        more = ""
        if len(text) > BODY_SHOWN:
            text, more = text[:BODY_SHOWN], f"<div class='mut small'>… {len(raw)} bytes in all</div>"
        return f"<pre>{_e(text)}</pre>{more}"
    # bytes and pickles: never decoded (unpickling can run code)
    shown = raw[:BODY_SHOWN]
    part = f", the first {BODY_SHOWN}" if len(raw) > BODY_SHOWN else ""
    return (f"<div class='mut small'>{_e(ct)}: {len(raw)} bytes, base64{part} (not decoded)</div>"
            f"<pre>{_e(base64.b64encode(shown).decode('ascii'))}</pre>")


class _Failed(Exception):
    """An action that could not be done: shown on ``where`` (default the queue's page)."""

    def __init__(self, message: str, where: Optional[str] = None) -> None:
        super().__init__(message)
        self.where = where


def _one(form: Form, key: str, default: str = "") -> str:
    v = form.get(key)
    return v[0] if v else default


def login_page() -> Response:
    """What a request without the token gets (401), for ``app._Auth``."""
    body = ("<div class='login card'><h1>qlog</h1><p>This server needs its token "
            "(<code>qlog serve --token-file</code> or <code>$QLOG_TOKEN</code>).</p>"
            "<form method='get' action='/'><div class='row'>"
            "<input type='password' name='token' autocomplete='current-password' aria-label='token' "
            "placeholder='token' required autofocus><button class='primary'>Open</button></div></form>"
            "<p class='mut small'>The browser keeps it in an HttpOnly cookie for this site.</p></div>")
    return _html("qlog: token", body, status=401)


def _html(title: str, body: str, status: int = 200, script: bool = False,
          header: str = "") -> HTMLResponse:
    nonce = secrets.token_urlsafe(12)
    js = f"<script nonce='{nonce}'>{_SCRIPT}</script>" if script else ""
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
           f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{header}"
           f"<main>{body}</main>{js}</body></html>")
    resp = HTMLResponse(doc, status_code=status)
    resp.headers["content-security-policy"] = (
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    resp.headers["x-frame-options"] = "DENY"
    resp.headers["x-content-type-options"] = "nosniff"
    resp.headers["referrer-policy"] = "same-origin"
    resp.headers["cache-control"] = "no-store"
    return resp


class Dashboard:
    """The dashboard's routes over ``api.broker``."""

    def __init__(self, api: Api, token: Optional[str]) -> None:
        self.api = api
        self.broker: Broker = api.broker
        self.token = token
        self.digest = form_digest(token)
        self._lock = threading.Lock()
        self._hist: Dict[str, Deque[Tuple[float, int, int]]] = {}
        self._samples = 0
        self._actions: Dict[str, Callable[[str, Form], Tuple[str, str]]] = {
            "send": self._send, "pause": self._pause, "resume": self._resume, "purge": self._purge,
            "redrive": self._redrive_all, "messages": self._selected,
        }

    # -- reading ---------------------------------------------------------------

    def _snapshot(self) -> List[Dict[str, Any]]:
        """Every queue's counts and rates; samples the counters."""
        stats: Dict[str, QueueStats] = {}
        dlqs: Dict[str, Optional[str]] = {}
        for name in self.broker.queues():
            try:
                q = self.broker.queue(name)
                stats[name] = q.stats()
                dlqs[name] = q.settings.dead_letter_queue
            except errors.QlogError:
                continue  # deleted meanwhile
        now = time.monotonic()
        series: Dict[str, Tuple[List[float], List[float]]] = {}
        with self._lock:
            for name in [n for n in self._hist if n not in stats]:
                del self._hist[name]
            sampled = False
            for name, s in stats.items():
                h = self._hist.setdefault(name, deque(maxlen=HISTORY))
                if not h or now - h[-1][0] >= SAMPLE_EVERY:
                    h.append((now, s.sent, s.acked + s.dead_lettered + s.deleted + s.expired))
                    sampled = True
                series[name] = self._rates(h)
            if sampled:
                self._samples += 1
        rows = []
        for name, s in stats.items():
            dlq = dlqs[name]
            dlq_backlog = stats[dlq].backlog if dlq is not None and dlq in stats else None
            rin, rout = series[name]
            text = {"backlog": f"{s.backlog:,}", "in_flight": f"{s.in_flight:,}", "delayed": f"{s.delayed:,}",
                    "dlq_backlog": "–" if dlq_backlog is None else f"{dlq_backlog:,}",
                    "oldest": _age(s.oldest_age), "state": "paused" if s.paused else "active",
                    "in": _rate(rin[-1] if rin else None), "out": _rate(rout[-1] if rout else None)}
            rows.append({"name": name, "backlog": s.backlog, "in_flight": s.in_flight, "delayed": s.delayed,
                         "dlq": dlq, "dlq_backlog": dlq_backlog, "oldest_age": s.oldest_age,
                         "paused": s.paused, "sent": s.sent, "rate_in": rin, "rate_out": rout, "text": text})
        return rows

    @staticmethod
    def _rates(h: Deque[Tuple[float, int, int]]) -> Tuple[List[float], List[float]]:
        pts = list(h)
        rin: List[float] = []
        rout: List[float] = []
        for (t0, s0, d0), (t1, s1, d1) in zip(pts, pts[1:]):
            dt = t1 - t0
            rin.append(round(max(0, s1 - s0) / dt, 3))
            rout.append(round(max(0, d1 - d0) / dt, 3))
        return rin, rout

    def _header(self, names: Optional[str] = None) -> str:
        """The bar on top; ``names`` (the queues shown) makes the page reload when they change."""
        reload = "" if names is None else f" data-names='{_e(names)}'"
        logout = self._form("/dashboard/logout", "<button class='small'>Log out</button>") if self.token else ""
        return (f"<header><a class='brand' href='/'>qlog</a><a href='/'>Queues</a>"
                f"<span class='mut small'>{_e(self.broker.engine)} · {_e(self.broker.path)}</span>"
                f"<span class='sp'></span><span id='live' class='live' data-src='/dashboard/api/stats'{reload}>"
                f"snapshot</span><noscript><span class='nojs small mut'>JavaScript is off: reload for new "
                f"numbers</span></noscript>{logout}</header>")

    def _form(self, action: str, inner: str, cls: str = "inline") -> str:
        return (f"<form method='post' action='{_e(action)}' class='{cls}'>"
                f"<input type='hidden' name='_digest' value='{self.digest}'>{inner}</form>")

    @staticmethod
    def _flash(request: Request) -> str:
        out = ""
        msg, err = request.query_params.get("msg"), request.query_params.get("err")
        if msg:
            out += f"<div class='flash ok' role='status'>{_e(msg)}</div>"
        if err:
            out += f"<div class='flash err' role='alert'>Error: {_e(err)}</div>"
        return out

    def _stat_cells(self, r: Dict[str, Any]) -> str:
        t = r["text"]
        dlq = r["dlq"]
        dlq_cell = ("<span class='mut'>–</span>" if dlq is None else
                    f"<a href='{_queue_url(dlq)}'>{_e(dlq)}</a> <span class='num' data-k='dlq_backlog'>"
                    f"{t['dlq_backlog']}</span>")
        return (f"<td class='num' data-k='backlog'>{t['backlog']}</td>"
                f"<td class='num' data-k='in_flight'>{t['in_flight']}</td>"
                f"<td class='num' data-k='delayed'>{t['delayed']}</td>"
                f"<td>{dlq_cell}</td><td class='num' data-k='oldest'>{t['oldest']}</td>"
                f"<td class='l'>{_spark('in', r['rate_in'])}</td><td class='l'>{_spark('out', r['rate_out'])}</td>"
                f"<td><span class='pill' data-k='state' data-v='{t['state']}'>{t['state']}</span></td>")

    _STAT_HEAD = ("<th>Backlog</th><th>In flight</th><th>Delayed</th><th>DLQ</th><th>Oldest</th>"
                  "<th class='l'>In</th><th class='l'>Out</th><th>State</th>")

    async def index(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None and self.token is not None:
            # _Auth let it through, so it is the token: keep it in a cookie, out of the address bar
            resp: Response = RedirectResponse(request.url.path, status_code=303)
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
            return resp
        rows = await run_in_threadpool(self._snapshot)
        names = ",".join(r["name"] for r in rows)
        trs = "".join(f"<tr data-queue='{_e(r['name'])}'><td class='l'><a href='{_queue_url(r['name'])}'>"
                      f"{_e(r['name'])}</a></td>{self._stat_cells(r)}</tr>" for r in rows)
        if rows:
            table = (f"<div class='tbl'><table class='queues'><thead><tr><th class='l'>Queue</th>"
                     f"{self._STAT_HEAD}</tr></thead><tbody>{trs}</tbody></table></div>"
                     "<p class='mut small'>In: messages sent per second. Out: acked, dead-lettered, "
                     "deleted or expired per second. DLQ: the backlog of the queue's dead-letter queue.</p>")
        else:
            table = ("<div class='card'>No queues yet. Send a message (<code>qlog send DIR QUEUE BODY</code>, "
                     "or the HTTP API) to create one.</div>")
        return _html("qlog: queues", f"<h1>Queues</h1>{self._flash(request)}{table}", script=True,
                     header=self._header(names))

    async def stats_json(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._snapshot)
        resp = JSONResponse({"time": time.time(), "sample": self._samples, "queues": rows})
        resp.headers["cache-control"] = "no-store"
        return resp

    def _queue_data(self, name: str, n: int) -> Optional[Dict[str, Any]]:
        if name not in self.broker.queues():
            return None
        q = self.broker.queue(name)
        rows = {r["name"]: r for r in self._snapshot()}
        if name not in rows:
            return None
        fed_by = []
        for other in rows:
            if other != name and rows[other]["dlq"] == name:
                fed_by.append(other)
        return {"q": q, "row": rows[name], "settings": q.settings, "messages": q.peek(n), "fed_by": fed_by}

    async def queue_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            n = int(request.query_params.get("n", PEEK_DEFAULT))
        except ValueError:
            n = PEEK_DEFAULT
        n = min(max(n, 1), MAX_PULL_BATCH)
        data = await run_in_threadpool(self._queue_data, name, n)
        if data is None:
            return self._not_found(request, name)
        row, s, msgs = data["row"], data["settings"], data["messages"]
        url = _queue_url(name)
        paused = row["paused"]
        parts = [f"<p class='small'><a href='/'>Queues</a> / {_e(name)}</p>",
                 f"<h1>{_e(name)}</h1>", self._flash(request),
                 f"<div class='tbl fit'><table class='stats'><thead><tr>{self._STAT_HEAD}</tr></thead>"
                 f"<tbody><tr data-queue='{_e(name)}'>{self._stat_cells(row)}</tr></tbody></table></div>"]
        # actions
        if paused:
            toggle = self._form(f"{url}/resume", "<button class='primary' id='resume'>Resume delivery</button>")
        else:
            toggle = self._form(f"{url}/pause", "<button id='pause'>Pause delivery</button>")
        delivery = (f"<div class='card'><h2>Delivery</h2><p>Delivery is <b>{'paused' if paused else 'active'}</b>"
                    f"{': sends are kept, nothing is delivered' if paused else ''}.</p>"
                    f"<div class='row'>{toggle}<a class='btn danger' id='purge' href='{url}/purge'>Purge…</a>"
                    "</div></div>")
        send = self._form(f"{url}/send", (
            "<h2>Send a message</h2><div class='row'><label>Content type <select name='content_type'>"
            "<option value='json'>json</option><option value='text'>text</option></select></label>"
            "<label>Delay (s) <input type='number' name='delay_seconds' min='0' step='any' "
            "style='width:6em'></label></div>"
            "<label>Body<textarea name='body' required placeholder='{\"hello\": \"world\"}'></textarea></label>"
            "<button class='primary' id='send'>Send</button>"), cls="card")
        dl = [("max_retries", s.max_retries), ("retry_delay", f"{s.retry_delay:g} s"),
              ("dead_letter_queue", s.dead_letter_queue or "–"),
              ("delivery_delay", f"{s.delivery_delay:g} s"), ("visibility_timeout", f"{s.visibility_timeout:g} s"),
              ("message_retention", "unlimited" if s.message_retention is None else _age(s.message_retention)),
              ("max_batch_size", s.max_batch_size), ("max_message_size", f"{s.max_message_size:,} bytes")]
        kv = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" if k != "dead_letter_queue" or not s.dead_letter_queue
                     else f"<dt>{k}</dt><dd><a href='{_queue_url(s.dead_letter_queue)}'>{_e(v)}</a></dd>"
                     for k, v in dl)
        if data["fed_by"]:
            links = ", ".join(f"<a href='{_queue_url(o)}'>{_e(o)}</a>" for o in data["fed_by"])
            kv += f"<dt>dead-letter queue of</dt><dd>{links}</dd>"
        settings = f"<div class='card'><h2>Settings</h2><dl class='kv'>{kv}</dl></div>"
        parts.append(f"<div class='grid'>{delivery}{send}{settings}</div>")
        parts.append(self._dead_letters(name, msgs))
        parts.append(self._messages(name, url, msgs, n, row["backlog"]))
        return _html(f"qlog: {name}", "".join(parts), script=True, header=self._header())

    def _dead_letters(self, name: str, msgs: List[Message]) -> str:
        groups: Dict[str, List[Message]] = {}
        for m in msgs:
            if m.dead_letter is not None:
                groups.setdefault(m.dead_letter.queue, []).append(m)
        if not groups:
            return ""
        url = _queue_url(name)
        trs = []
        for origin, ms in sorted(groups.items()):
            ids = "".join(f"<input type='hidden' name='id' value='{_e(m.ref)}'>" for m in ms)
            redrive = self._form(f"{url}/messages", ids + f"<input type='hidden' name='op' value='redrive'>"
                                 f"<button class='primary' data-group='{_e(origin)}'>Redrive {len(ms)} to "
                                 f"{_e(origin)}</button>")
            delete = self._form(f"{url}/messages", ids + "<input type='hidden' name='op' value='delete'>"
                                f"<button class='danger'>Delete {len(ms)}</button>")
            trs.append(f"<tr><td class='l'><a href='{_queue_url(origin)}'>{_e(origin)}</a></td>"
                       f"<td class='num'>{len(ms)}</td><td class='l'>{redrive} {delete}</td></tr>")
        everything = self._form(f"{url}/redrive", "<button id='redrive-all'>Redrive every message to the queue "
                                "it failed in</button>")
        return ("<h2>Dead letters</h2><div class='tbl'><table><thead><tr><th class='l'>Failed in</th>"
                "<th>Messages shown</th><th class='l'>Group</th></tr></thead><tbody>" + "".join(trs) +
                f"</tbody></table></div><p class='row'>{everything}<span class='mut small'>(the whole queue, "
                "not only the messages shown; each keeps its body and content type and starts again at "
                "attempt 1)</span></p>")

    def _messages(self, name: str, url: str, msgs: List[Message], n: int, backlog: int) -> str:
        sizes = " · ".join(f"<a href='{url}?n={k}'>{k}</a>" if k != n else f"<b>{k}</b>" for k in (10, 25, 100, 500))
        head = (f"<h2>Messages</h2><p class='mut small'>The oldest {len(msgs)} of {backlog:,} not done (peek: "
                f"nothing is leased or changed). Show {sizes}.</p>")
        if not msgs:
            return head + "<div class='card mut'>The queue holds no messages.</div>"
        any_dead = any(m.dead_letter is not None for m in msgs)
        trs = []
        for m in msgs:
            dl = m.dead_letter
            origin = ("<span class='mut'>–</span>" if dl is None else
                      f"<a href='{_queue_url(dl.queue)}'>{_e(dl.queue)}</a><div class='mut small'>after "
                      f"{dl.attempts} attempt{'s' if dl.attempts != 1 else ''}, {_since(dl.dead_lettered_at)}</div>")
            ref = m.ref
            trs.append(f"<tr data-message='{_e(m.id)}'><td><input type='checkbox' name='id' value='{_e(ref)}' "
                       f"aria-label='select {_e(m.id)}'></td><td class='l small'><code>{_e(m.id)}</code>"
                       f"<div class='mut'>sent {_since(m.timestamp)}</div></td>"
                       f"<td class='num'>{m.attempts}</td><td class='l'>{_e(m.content_type)}</td>"
                       f"<td class='l'>{origin}</td><td class='body'>{_body(m)}</td></tr>")
        buttons = "<button name='op' value='delete' class='danger' id='delete-selected'>Delete selected</button>"
        if any_dead:
            buttons = ("<button name='op' value='redrive' class='primary' id='redrive-selected'>Redrive selected"
                       "</button> ") + buttons
        table = (f"<div class='row' style='margin-bottom:.5em'>{buttons}</div><div class='tbl'><table "
                 "class='messages'><thead><tr><th><input type='checkbox' data-all hidden aria-label='select all'>"
                 "</th><th class='l'>Id</th><th>Attempts</th><th class='l'>Type</th><th class='l'>Dead-lettered "
                 "from</th><th class='l'>Body</th></tr></thead><tbody>" + "".join(trs) + "</tbody></table></div>")
        return head + self._form(f"{url}/messages", table, cls="")

    def _not_found(self, request: Request, name: str) -> Response:
        body = (f"<h1>No queue {_e(name)}</h1>{self._flash(request)}<p>It does not exist (any more). "
                "<a href='/'>All queues</a></p>")
        return _html("qlog: no such queue", body, status=404, header=self._header())

    async def purge_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        data = await run_in_threadpool(self._queue_data, name, 1)
        if data is None:
            return self._not_found(request, name)
        url = _queue_url(name)
        backlog = data["row"]["backlog"]
        form = self._form(f"{url}/purge", (
            f"<label>Type the queue's name, <code>{_e(name)}</code>, to confirm: "
            f"<input type='text' name='confirm' required autocomplete='off' spellcheck='false' "
            f"autofocus></label><div class='row'>"
            f"<button class='danger solid' id='confirm-purge'>Purge {_e(name)}</button>"
            f"<a class='btn' href='{url}'>Cancel</a></div>"), cls="card")
        body = (f"<p class='small'><a href='/'>Queues</a> / <a href='{url}'>{_e(name)}</a> / purge</p>"
                f"<h1>Purge {_e(name)}?</h1>{self._flash(request)}<p>This deletes every message sent to "
                f"<b>{_e(name)}</b> so far — {backlog:,} not done now — and cannot be undone.</p>{form}")
        return _html(f"qlog: purge {name}", body, header=self._header())

    # -- acting ----------------------------------------------------------------

    async def _read_form(self, request: Request) -> Form:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise ApiError(415, 0, "the dashboard takes application/x-www-form-urlencoded forms")
        limit = self.api.max_body
        chunks: List[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, 0, f"the form is larger than the server's limit of {limit} bytes")
            chunks.append(chunk)
        return parse_qs(b"".join(chunks).decode("latin-1"), keep_blank_values=True, max_num_fields=10_000)

    def _trusted(self, request: Request, form: Form) -> bool:
        """The form came from this dashboard: it carries the digest (and,
        with no token, a browser says it was posted from this site)."""
        if not hmac.compare_digest(_one(form, "_digest").encode(), self.digest.encode()):
            return False
        if self.token is None:
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
                return False
        return True

    def _refused(self, status: int, why: str) -> Response:
        body = f"<h1>Refused</h1><div class='flash err' role='alert'>{_e(why)}</div><p><a href='/'>Queues</a></p>"
        return _html("qlog: refused", body, status=status, header=self._header())

    async def act(self, request: Request) -> Response:
        name = request.path_params["name"]
        fn = self._actions.get(request.path_params["action"])
        if fn is None:
            return self._refused(404, f"no dashboard action {request.path_params['action']!r}")
        try:
            form = await self._read_form(request)
        except ApiError as e:
            return self._refused(e.status, e.message)
        if not self._trusted(request, form):
            return self._refused(403, "this form did not come from this dashboard (its digest is missing or "
                                 "wrong): reload the page and try again; nothing was changed")
        try:
            where, msg = await run_in_threadpool(fn, name, form)
        except _Failed as e:
            return self._back(e.where or _queue_url(name), err=str(e))
        except ApiError as e:
            return self._back(_queue_url(name), err=e.message)
        except errors.QlogError as e:
            return self._back(_queue_url(name), err=str(e))
        return self._back(where, msg=msg)

    @staticmethod
    def _back(where: str, **flash: str) -> Response:
        return RedirectResponse(f"{where}?{urlencode(flash)}", status_code=303)

    async def logout(self, request: Request) -> Response:
        try:
            form = await self._read_form(request)
        except ApiError as e:
            return self._refused(e.status, e.message)
        if not self._trusted(request, form):
            return self._refused(403, "this form did not come from this dashboard; nothing was changed")
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return resp

    def _queue(self, name: str) -> Queue:
        if name not in self.broker.queues():
            raise _Failed(f"queue {name!r} does not exist", "/")
        return self.broker.queue(name)

    def _send(self, name: str, form: Form) -> Tuple[str, str]:
        q = self._queue(name)
        ct = _one(form, "content_type", "json")
        if ct not in ("json", "text"):
            raise _Failed(f"content type must be json or text, got {ct!r}")
        text = _one(form, "body").replace("\r\n", "\n")
        body: Any = text
        if ct == "json":
            try:
                body = json.loads(text)
            except ValueError as e:
                raise _Failed(f"the body is not valid JSON ({e}); send it as text, or fix it; "
                              "nothing was sent") from None
        raw_delay = _one(form, "delay_seconds").strip()
        delay: Optional[float] = None
        if raw_delay:
            try:
                delay = float(raw_delay)
            except ValueError:
                raise _Failed(f"the delay must be a number of seconds, got {raw_delay!r}") from None
        mid = q.send(body, content_type=ct, delay_seconds=delay)
        return _queue_url(name), f"sent message {mid} to {name}"

    def _pause(self, name: str, form: Form) -> Tuple[str, str]:
        self._queue(name).pause_delivery()
        return _queue_url(name), f"paused delivery of {name}"

    def _resume(self, name: str, form: Form) -> Tuple[str, str]:
        self._queue(name).resume_delivery()
        return _queue_url(name), f"resumed delivery of {name}"

    def _purge(self, name: str, form: Form) -> Tuple[str, str]:
        q = self._queue(name)
        if _one(form, "confirm").strip() != name:
            raise _Failed(f"type the queue's name, {name}, to confirm the purge; nothing was deleted",
                          f"{_queue_url(name)}/purge")
        n = q.purge()
        return _queue_url(name), f"purged {name}: {n:,} message{'s' if n != 1 else ''} deleted"

    def _redrive_all(self, name: str, form: Form) -> Tuple[str, str]:
        self._queue(name)
        moved = self.broker.redrive(name)
        if not moved:
            return _queue_url(name), "nothing to redrive"
        return _queue_url(name), "moved " + ", ".join(f"{n:,} to {t}" for t, n in sorted(moved.items()))

    def _selected(self, name: str, form: Form) -> Tuple[str, str]:
        q = self._queue(name)
        ids = form.get("id", [])
        op = _one(form, "op")
        if not ids:
            raise _Failed("select messages first; nothing was changed")
        if op == "delete":
            n = q.delete_messages(ids)
            if n < len(set(ids)):
                raise _Failed(f"deleted {n:,} of the {len(set(ids)):,} messages selected: the others were done "
                              "already, or could not be deleted")
            return _queue_url(name), f"deleted {n:,} message{'s' if n != 1 else ''}"
        if op == "redrive":
            return _queue_url(name), self._redrive_ids(q, ids)
        raise _Failed(f"unknown operation {op!r}")

    def _redrive_ids(self, q: Queue, ids: List[str]) -> str:
        moved = self.broker.redrive_messages(q.name, ids)
        out = "moved " + ", ".join(f"{n:,} to {origin}" for origin, n in sorted(moved.items())) if moved \
            else "moved nothing"
        gone = len(set(ids)) - sum(moved.values())
        if gone:
            out += f" ({gone:,} of those selected were no longer in {q.name})"
        return out

    def routes(self) -> List[Route]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/dashboard", self.index, methods=["GET"]),
            Route("/dashboard/api/stats", self.stats_json, methods=["GET"]),
            Route("/dashboard/logout", self.logout, methods=["POST"]),
            Route("/dashboard/queues/{name}", self.queue_page, methods=["GET"]),
            Route("/dashboard/queues/{name}/purge", self.purge_page, methods=["GET"]),
            Route("/dashboard/queues/{name}/{action}", self.act, methods=["POST"]),
        ]
