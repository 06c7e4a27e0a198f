// <notifyd-chat>: a 1-on-1 (`peer`) or group (`room`) chat served by notifyd
// (GET /ui/notifyd-chat.js). A plain ES module: no build step, no dependency, no request to
// any host but `base-url`. Attributes: base-url, tenant, user, peer | room, locale.
// Property: tokenProvider (async () => JWT). Parts: message (+ own, pending), composer,
// typing, presence, receipt. See README "Web components".

import { Connection, nextLink, pickStrings } from "./notifyd-core.js";

const STRINGS = {
  en: {
    chat: "Chat",
    messages: "Messages",
    write: "Write a message",
    send: "Send",
    typing: (who) => `${who} is typing…`,
    online: (who) => `${who} is online`,
    offline: (who) => `${who} is offline`,
    groupOnline: (n) => `${n} online`,
    seen: "Seen",
    seenBy: (who) => `Seen by ${who}`,
    sending: "Sending…",
    notSent: "Not sent",
    empty: "No messages yet.",
    error: "The chat could not be loaded.",
    reconnecting: "Reconnecting…",
  },
  fr: {
    chat: "Discussion",
    messages: "Messages",
    write: "Écrire un message",
    send: "Envoyer",
    typing: (who) => `${who} écrit…`,
    online: (who) => `${who} est en ligne`,
    offline: (who) => `${who} est hors ligne`,
    groupOnline: (n) => `${n} en ligne`,
    seen: "Vu",
    seenBy: (who) => `Vu par ${who}`,
    sending: "Envoi…",
    notSent: "Non envoyé",
    empty: "Pas encore de message.",
    error: "Impossible de charger la discussion.",
    reconnecting: "Reconnexion…",
  },
};

const STYLE = `
:host { display: flex; flex-direction: column; height: var(--notifyd-chat-height, 420px);
  font: var(--notifyd-font, 14px/1.4 system-ui, sans-serif); color: var(--notifyd-fg, #1b1f24);
  background: var(--notifyd-bg, #fff); border: 1px solid var(--notifyd-border, #c4c7c5);
  border-radius: var(--notifyd-radius, 8px); overflow: hidden; }
.head { display: flex; justify-content: space-between; align-items: baseline; padding: 8px 12px;
  border-bottom: 1px solid var(--notifyd-border, #c4c7c5); }
h2 { font-size: 1em; margin: 0; }
[part~="presence"] { font-size: .85em; color: var(--notifyd-muted, #4a4f55); }
.log { flex: 1; overflow-y: auto; padding: 8px 12px; display: flex; flex-direction: column; gap: 6px; }
[part~="message"] { max-width: 80%; padding: 6px 10px; border-radius: 12px; overflow-wrap: anywhere;
  background: var(--notifyd-bubble-bg, #f0f1f3); align-self: flex-start; }
[part~="message"][part~="own"] { align-self: flex-end; background: var(--notifyd-own-bubble-bg, #0b57d0);
  color: var(--notifyd-own-bubble-fg, #fff); }
[part~="message"][part~="pending"] { opacity: .75; }
.sender { display: block; font-size: .8em; font-weight: 600; }
[part~="receipt"] { align-self: flex-end; font-size: .8em; color: var(--notifyd-muted, #4a4f55); }
[part~="receipt"]:empty, [part~="typing"]:empty, .error:empty, .status:empty { display: none; }
[part~="typing"], .status { padding: 2px 12px; font-size: .85em; color: var(--notifyd-muted, #4a4f55); }
[part~="composer"] { display: flex; gap: 6px; padding: 8px; border-top: 1px solid var(--notifyd-border, #c4c7c5); }
textarea { flex: 1; font: inherit; resize: none; padding: 6px; border-radius: 6px;
  border: 1px solid var(--notifyd-border, #8e918f); }
[part~="composer"] button { font: inherit; border: 0; border-radius: 6px; padding: 6px 12px;
  background: var(--notifyd-accent, #0b57d0); color: var(--notifyd-accent-fg, #fff); cursor: pointer; }
button:focus-visible, textarea:focus-visible { outline: 2px solid var(--notifyd-accent, #0b57d0); outline-offset: 2px; }
.error { padding: 2px 12px; color: var(--notifyd-error, #b3261e); font-size: .85em; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
.top { height: 1px; flex: none; }
`;

const PAGE = 30;
const TYPING_EVERY = 2000; // ms between our own typing frames while the user types
const TYPING_SHOWN = 5000; // ms a peer's typing indicator stays without a new frame

let counter = 0;

export class NotifydChat extends HTMLElement {
  static observedAttributes = ["base-url", "tenant", "user", "peer", "room", "locale"];

  constructor() {
    super();
    this.attachShadow({ mode: "open" });
    this._tokenProvider = null;
    this.reset();
  }

  reset() {
    this.connection = null;
    this.roomName = null;
    this.messages = new Map(); // id → {data, element}
    this.pending = new Map(); // client_id → {text, element}
    this.online = new Set();
    this.typers = new Map(); // user → timer
    this.readUpTo = new Map(); // user → the id of the last message they read
    this.lastReadSent = "";
    this.next = null;
    this.paged = false;
    this.gapSeen = false;
    this.lastTyping = 0;
  }

  get tokenProvider() {
    return this._tokenProvider;
  }

  set tokenProvider(provider) {
    this._tokenProvider = provider;
    if (this.isConnected && !this.connection) this.start();
  }

  get t() {
    return pickStrings(STRINGS, this.getAttribute("locale"));
  }

  get me() {
    return this.getAttribute("user") || "";
  }

  connectedCallback() {
    this.render();
    if (this._tokenProvider) this.start();
  }

  disconnectedCallback() {
    document.removeEventListener("visibilitychange", this.onVisible);
    this.connection?.stop();
    for (const timer of this.typers.values()) clearTimeout(timer);
    this.reset();
  }

  attributeChangedCallback(name, before, after) {
    if (before === after || !this.connection) return;
    this.disconnectedCallback(); // another room, user or server: start over
    this.connectedCallback();
  }

  render() {
    const t = this.t;
    const title = this.getAttribute("peer") || this.getAttribute("room") || t.chat;
    this.shadowRoot.innerHTML = `<style>${STYLE}</style>
<div class="head"><h2 id="title"></h2><span part="presence" role="status"></span></div>
<div class="log" role="log" aria-live="polite" aria-labelledby="title" tabindex="0"><div class="top"></div></div>
<div class="status" role="status"></div>
<div part="typing" aria-live="polite"></div>
<div class="error" role="alert"></div>
<form part="composer"><label class="sr" for="text">${t.write}</label>
<textarea id="text" rows="1" maxlength="100000" placeholder="${t.write}"></textarea>
<button type="submit">${t.send}</button></form>`;
    const root = this.shadowRoot;
    root.getElementById("title").textContent = title;
    this.log = root.querySelector(".log");
    this.presence = root.querySelector('[part~="presence"]');
    this.typing = root.querySelector('[part~="typing"]');
    this.errorLine = root.querySelector(".error");
    this.status = root.querySelector(".status");
    this.text = root.querySelector("textarea");
    this.receipt = document.createElement("div");
    this.receipt.setAttribute("part", "receipt");
    const form = root.querySelector("form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    this.text.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      }
    });
    this.text.addEventListener("input", () => this.typed());
    this.observer = new IntersectionObserver(
      (entries) => entries.some((e) => e.isIntersecting) && this.loadOlder(),
      { root: this.log, rootMargin: "100px" },
    );
    this.observer.observe(root.querySelector(".top"));
    this.onVisible = () => this.sendRead();
    document.addEventListener("visibilitychange", this.onVisible);
  }

  async start() {
    this.connection = new Connection(
      this,
      "",
      (frame, resumed) => this.onFrame(frame, resumed),
      (state) => this.onState(state),
    );
    try {
      this.roomName = this.getAttribute("room") || (await this.dmName());
    } catch {
      this.status.textContent = this.t.error;
      return;
    }
    this.connection.path = `/ws/chat/${encodeURIComponent(this.roomName)}/`;
    this.connection.start();
  }

  async dmName() {
    const peer = encodeURIComponent(this.getAttribute("peer") || "");
    const response = await this.connection.fetch(`/rooms/dm/${peer}/`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return (await response.json()).name;
  }

  onState(state) {
    this.dataset.state = state;
    if (state === "open") {
      // the server answers commands only once it has replayed what we missed: the pong
      // says the socket is caught up
      this.connection.send({ type: "ping" });
    } else if (state === "offline") {
      this.status.textContent = this.t.reconnecting;
    } else if (state === "refused") {
      this.status.textContent = this.t.error;
    }
  }

  onFrame(frame, resumed) {
    switch (frame.type) {
      case "message":
        this.received(frame);
        break;
      case "presence":
        this.online = new Set(frame.online || []);
        this.paintPresence();
        break;
      case "join":
        this.online.add(frame.user_id);
        this.paintPresence();
        break;
      case "leave":
        this.online.delete(frame.user_id);
        this.paintPresence();
        break;
      case "typing":
        this.peerTyping(frame.user_id, frame.typing !== false);
        break;
      case "read":
        this.readUpTo.set(frame.user_id, frame.up_to);
        this.paintReceipt();
        break;
      case "gap":
        this.gapSeen = true;
        break;
      case "error":
        this.refused(frame.detail || "");
        break;
      case "pong":
        this.caughtUp(resumed);
        break;
      default:
        break;
    }
  }

  async caughtUp(resumed) {
    this.connection.settled();
    this.status.textContent = "";
    if (!resumed || this.gapSeen || !this.paged) await this.refetch();
    const gap = this.gapSeen;
    this.gapSeen = false;
    // what we sent that never came back: sent again (same client_id), unless a gap means
    // it may be stored already (then the user decides)
    const socket = this.connection.ws;
    for (const [clientId, entry] of this.pending) {
      if (entry.socket === socket) continue; // sent on this socket: its echo is on its way
      if (gap) {
        this.failPending(clientId, this.t.notSent);
      } else if (this.connection.send(this.frame(entry.text, clientId))) {
        entry.socket = socket;
      }
    }
    this.dataset.state = "live";
    this.sendRead();
  }

  async refetch() {
    try {
      const room = encodeURIComponent(this.roomName);
      const response = await this.connection.fetch(`/rooms/${room}/messages/?limit=${PAGE}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const rows = await response.json();
      for (const row of rows) this.add(row);
      if (!this.paged) {
        this.paged = true;
        this.next = nextLink(response.headers.get("Link"));
        this.log.scrollTop = this.log.scrollHeight;
      }
      for (const row of rows) {
        // a 1-on-1 row read by its receiver is a receipt we may not have seen live
        if (row.sender_id === this.me && row.is_read && row.receiver_id) {
          const known = this.readUpTo.get(row.receiver_id) || "";
          if (row.id > known) this.readUpTo.set(row.receiver_id, row.id);
        }
      }
      this.paintReceipt();
      if (!this.messages.size) this.status.textContent = this.t.empty;
    } catch {
      if (!this.messages.size) this.status.textContent = this.t.error;
    }
  }

  async loadOlder() {
    if (!this.next || this.loadingOlder) return;
    this.loadingOlder = true;
    try {
      const url = new URL(this.next, this.connection.base() + "/").toString();
      const response = await this.connection.fetch(url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const height = this.log.scrollHeight;
      for (const row of await response.json()) this.add(row);
      this.log.scrollTop += this.log.scrollHeight - height; // keep what the user was reading
      this.next = nextLink(response.headers.get("Link"));
    } catch {
      /* tried again at the next scroll */
    } finally {
      this.loadingOlder = false;
    }
  }

  received(frame) {
    const pending = frame.client_id && this.pending.get(frame.client_id);
    if (pending && frame.sender_id === this.me) {
      // our own message, back from the server: the pending bubble becomes it (shown once)
      this.pending.delete(frame.client_id);
      pending.element.remove();
    }
    this.peerTyping(frame.sender_id, false);
    const atBottom = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 40;
    if (this.add({ ...frame, content: frame.message }) && atBottom) {
      this.log.scrollTop = this.log.scrollHeight;
    }
    this.status.textContent = "";
    this.sendRead();
  }

  /** One message (a REST row or a live frame), placed by id (UUIDv7: oldest first). */
  add(data) {
    if (this.messages.has(data.id)) return false;
    const element = this.bubble(data.sender_id, data.content ?? data.message ?? "", data.sent_at);
    element.dataset.id = data.id;
    this.messages.set(data.id, { data, element });
    const bubbles = [...this.log.querySelectorAll('[part~="message"]:not([part~="pending"])')];
    const later = bubbles.find((b) => b.dataset.id > data.id);
    if (later) this.log.insertBefore(element, later);
    else {
      const firstPending = this.log.querySelector('[part~="pending"]');
      this.log.insertBefore(element, firstPending || null);
    }
    this.paintReceipt();
    return true;
  }

  bubble(sender, text, sentAt, pending = false) {
    const own = sender === this.me;
    const element = document.createElement("div");
    element.setAttribute("part", ["message", own && "own", pending && "pending"].filter(Boolean).join(" "));
    if (!own && this.getAttribute("room")) {
      const who = document.createElement("span");
      who.className = "sender";
      who.textContent = sender;
      element.append(who);
    }
    const body = document.createElement("span");
    body.textContent = text;
    element.append(body);
    if (sentAt) element.title = new Date(sentAt).toLocaleString(this.getAttribute("locale") || undefined);
    return element;
  }

  frame(text, clientId) {
    const frame = { type: "message", message: text, client_id: clientId };
    const peer = this.getAttribute("peer");
    if (peer) frame.receiver_id = peer;
    return frame;
  }

  submit() {
    const text = this.text.value;
    if (!text.trim()) return;
    const clientId = `c${Date.now().toString(36)}-${(counter++).toString(36)}`;
    const element = this.bubble(this.me, text, null, true);
    element.dataset.clientId = clientId;
    this.log.append(element);
    this.log.scrollTop = this.log.scrollHeight;
    // not sent now (offline): sent when a socket is caught up again
    const sent = this.connection.send(this.frame(text, clientId));
    this.pending.set(clientId, { text, element, socket: sent ? this.connection.ws : null });
    this.text.value = "";
    this.errorLine.textContent = "";
    this.lastTyping = 0;
  }

  /** The server refused a frame: the newest pending message is the one just sent; its text
   * goes back into the composer, with the server's own words. */
  refused(detail) {
    const last = [...this.pending.keys()].pop();
    if (last !== undefined) {
      const entry = this.pending.get(last);
      this.pending.delete(last);
      entry.element.remove();
      if (!this.text.value) this.text.value = entry.text;
    }
    this.errorLine.textContent = detail;
  }

  failPending(clientId, why) {
    const entry = this.pending.get(clientId);
    if (!entry) return;
    this.pending.delete(clientId);
    entry.element.remove();
    if (!this.text.value) this.text.value = entry.text;
    this.errorLine.textContent = why;
  }

  typed() {
    const now = Date.now();
    if (now - this.lastTyping < TYPING_EVERY) return;
    this.lastTyping = now;
    this.connection?.send({ type: "typing", typing: true });
  }

  peerTyping(user, typing) {
    if (user === this.me) return;
    clearTimeout(this.typers.get(user));
    this.typers.delete(user);
    if (typing) {
      this.typers.set(
        user,
        setTimeout(() => this.peerTyping(user, false), TYPING_SHOWN),
      );
    }
    const who = [...this.typers.keys()];
    this.typing.textContent = who.length ? this.t.typing(who.join(", ")) : "";
  }

  paintPresence() {
    const peer = this.getAttribute("peer");
    if (peer) {
      this.presence.textContent = this.online.has(peer) ? this.t.online(peer) : this.t.offline(peer);
    } else {
      this.presence.textContent = this.t.groupOnline(this.online.size);
    }
  }

  /** "Seen" under our newest message that another member has read up to. */
  paintReceipt() {
    const own = [...this.messages.values()].filter((m) => m.data.sender_id === this.me);
    if (!own.length) return;
    const newest = own.reduce((a, b) => (a.data.id > b.data.id ? a : b));
    const readers = [...this.readUpTo.entries()]
      .filter(([user, upTo]) => user !== this.me && upTo >= newest.data.id)
      .map(([user]) => user);
    if (!readers.length) {
      this.receipt.textContent = "";
      return;
    }
    this.receipt.textContent = this.getAttribute("peer") ? this.t.seen : this.t.seenBy(readers.join(", "));
    newest.element.after(this.receipt);
  }

  /** Tells the server we read up to the newest message from someone else, while visible. */
  sendRead() {
    if (document.visibilityState !== "visible" || !this.connection) return;
    let newest = "";
    for (const [id, m] of this.messages) if (m.data.sender_id !== this.me && id > newest) newest = id;
    if (newest && newest > this.lastReadSent && this.connection.send({ type: "read", up_to: newest })) {
      this.lastReadSent = newest;
    }
  }
}

if (!customElements.get("notifyd-chat")) customElements.define("notifyd-chat", NotifydChat);
