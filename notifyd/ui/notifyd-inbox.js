// <notifyd-inbox>: a notification center served by notifyd (GET /ui/notifyd-inbox.js).
// A plain ES module: no build step, no dependency, no request to any host but `base-url`.
// Attributes: base-url, tenant, user, locale. Property: tokenProvider (async () => JWT).
// Parts: bell, badge, panel, item (+ unread), mark-all-read. See README "Web components".

import { Connection, nextLink, pickStrings, relativeTime } from "./notifyd-core.js";

const STRINGS = {
  en: {
    notifications: "Notifications",
    bell: (n) => (n === 0 ? "Notifications, none unread" : `Notifications, ${n} unread`),
    markAll: "Mark all as read",
    empty: "You are all caught up.",
    loading: "Loading…",
    error: "Notifications could not be loaded.",
    retry: "Retry",
    offline: "Reconnecting…",
    unread: "unread",
  },
  fr: {
    notifications: "Notifications",
    bell: (n) => (n === 0 ? "Notifications, aucune non lue" : `Notifications, ${n} non lues`),
    markAll: "Tout marquer comme lu",
    empty: "Vous êtes à jour.",
    loading: "Chargement…",
    error: "Impossible de charger les notifications.",
    retry: "Réessayer",
    offline: "Reconnexion…",
    unread: "non lue",
  },
};

const STYLE = `
:host { display: inline-block; position: relative; font: var(--notifyd-font, 14px/1.4 system-ui, sans-serif);
  color: var(--notifyd-fg, #1b1f24); }
button { font: inherit; color: inherit; }
[part~="bell"] { position: relative; border: 0; background: transparent; cursor: pointer;
  padding: 6px; border-radius: var(--notifyd-radius, 8px); }
[part~="bell"]:focus-visible, button:focus-visible { outline: 2px solid var(--notifyd-accent, #0b57d0); outline-offset: 2px; }
[part~="bell"] svg { width: 24px; height: 24px; display: block; }
[part~="badge"] { position: absolute; top: 0; right: 0; min-width: 18px; height: 18px; padding: 0 4px;
  box-sizing: border-box; border-radius: 9px; background: var(--notifyd-badge-bg, #b3261e);
  color: var(--notifyd-badge-fg, #fff); font-size: 11px; line-height: 18px; text-align: center; }
[part~="badge"][hidden], [part~="panel"][hidden] { display: none; }
[part~="panel"] { position: absolute; right: 0; top: calc(100% + 4px); z-index: 1000;
  width: var(--notifyd-panel-width, 360px); max-height: var(--notifyd-panel-height, 480px);
  display: flex; flex-direction: column; background: var(--notifyd-bg, #fff);
  border: 1px solid var(--notifyd-border, #c4c7c5); border-radius: var(--notifyd-radius, 8px);
  box-shadow: 0 6px 24px rgba(0,0,0,.16); }
.head { display: flex; align-items: center; justify-content: space-between; padding: 8px 12px;
  border-bottom: 1px solid var(--notifyd-border, #c4c7c5); }
h2 { font-size: 1em; margin: 0; }
[part~="mark-all-read"] { border: 0; background: transparent; color: var(--notifyd-accent, #0b57d0);
  cursor: pointer; padding: 4px; }
.scroll { overflow-y: auto; flex: 1; }
ul { list-style: none; margin: 0; padding: 0; }
[part~="item"] { border-bottom: 1px solid var(--notifyd-border, #e3e3e3); }
[part~="item"] > button { display: block; width: 100%; text-align: left; border: 0; background: transparent;
  padding: 10px 12px; cursor: pointer; }
[part~="item"][data-unread] > button { background: var(--notifyd-unread-bg, #eef3fd); }
[part~="item"][data-unread] .subject::before { content: ""; display: inline-block; width: 8px; height: 8px;
  margin-right: 6px; border-radius: 4px; background: var(--notifyd-accent, #0b57d0); }
.subject { font-weight: 600; display: block; }
.message { display: block; margin-top: 2px; overflow-wrap: anywhere; }
[part~="item"]:not([data-open]) .message { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
time { display: block; margin-top: 2px; font-size: .85em; color: var(--notifyd-muted, #4a4f55); }
.status { padding: 12px; color: var(--notifyd-muted, #4a4f55); }
.status:empty { display: none; }
.sentinel { height: 1px; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
`;

const BELL_SVG = `<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path fill="currentColor"
 d="M12 22a2 2 0 0 0 2-2h-4a2 2 0 0 0 2 2zm6-6V11c0-3.07-1.64-5.64-4.5-6.32V4a1.5 1.5 0 0 0-3 0v.68C7.63 5.36 6 7.92 6 11v5l-2 2v1h16v-1l-2-2z"/></svg>`;

function strings(locale) {
  return pickStrings(STRINGS, locale);
}

const PAGE = 30;

export class NotifydInbox extends HTMLElement {
  static observedAttributes = ["base-url", "tenant", "user", "locale"];

  constructor() {
    super();
    this.attachShadow({ mode: "open" });
    this.items = new Map(); // id → {data, element}
    this.unread = 0;
    this.next = null; // the Link cursor of the next page
    this.paged = false; // whether the first page (and so `next`) was read
    this.gapSeen = false;
    this.loadingPage = false;
    this.reconcileTimer = null;
    this.reconciling = false;
    this.reconcileAgain = false;
    this.connection = null;
    this._tokenProvider = null;
  }

  get tokenProvider() {
    return this._tokenProvider;
  }

  set tokenProvider(provider) {
    this._tokenProvider = provider;
    if (this.isConnected && !this.connection) this.start();
  }

  connectedCallback() {
    this.render();
    if (this.items.size) this.redraw(); // moved in the page: what it held is shown again
    if (this._tokenProvider) this.start();
    this.clock = setInterval(() => this.updateTimes(), 60000);
  }

  disconnectedCallback() {
    clearInterval(this.clock);
    this.connection?.stop();
    this.connection = null;
  }

  attributeChangedCallback(name, before, after) {
    if (before === after || !this.connection) return;
    if (name === "locale") {
      this.render();
      for (const entry of this.items.values()) entry.element = null;
      this.redraw();
      return;
    }
    this.disconnectedCallback(); // another user or server: start over
    this.items.clear();
    this.next = null;
    this.paged = false;
    this.connectedCallback();
  }

  get t() {
    return strings(this.getAttribute("locale"));
  }

  render() {
    const t = this.t;
    this.shadowRoot.innerHTML = `<style>${STYLE}</style>
<button part="bell" type="button" aria-haspopup="true" aria-expanded="false" aria-controls="panel">${BELL_SVG}<span part="badge" hidden aria-hidden="true">0</span></button>
<div part="panel" id="panel" role="region" aria-labelledby="title" hidden tabindex="-1">
  <div class="head"><h2 id="title">${t.notifications}</h2><button part="mark-all-read" type="button">${t.markAll}</button></div>
  <div class="scroll"><div class="status" role="status" aria-live="polite"></div><ul aria-labelledby="title"></ul><div class="sentinel"></div></div>
</div>`;
    const root = this.shadowRoot;
    this.bell = root.querySelector('[part~="bell"]');
    this.badge = root.querySelector('[part~="badge"]');
    this.panel = root.querySelector('[part~="panel"]');
    this.list = root.querySelector("ul");
    this.status = root.querySelector(".status");
    this.bell.addEventListener("click", () => this.toggle());
    root.querySelector('[part~="mark-all-read"]').addEventListener("click", () => this.markAll());
    this.panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        this.toggle(false);
        this.bell.focus();
      }
    });
    const sentinel = root.querySelector(".sentinel");
    this.observer = new IntersectionObserver(
      (entries) => entries.some((e) => e.isIntersecting) && this.loadMore(),
      { root: root.querySelector(".scroll"), rootMargin: "200px" },
    );
    this.observer.observe(sentinel);
    this.setUnread(this.unread);
  }

  start() {
    const tenant = encodeURIComponent(this.getAttribute("tenant") || "");
    const user = encodeURIComponent(this.getAttribute("user") || "");
    this.showStatus("loading");
    this.connection = new Connection(
      this,
      `/ws/notifications/${tenant}/${user}/`,
      (frame, resumed) => this.onFrame(frame, resumed),
      (state) => this.onState(state),
    );
    this.connection.start();
  }

  onState(state) {
    this.dataset.state = state;
    if (state === "refused") this.showStatus("error");
  }

  onFrame(frame, resumed) {
    switch (frame.type) {
      case "notification":
        if (this.add(frame, true)) {
          this.setUnread(this.unread + 1);
          this.reconcile();
        }
        break;
      case "unread_count":
        if ("updated" in frame) {
          // another tab or device marked some read: which, the first page says; none
          // left unread means every one shown is read
          if (frame.count === 0) for (const id of this.items.keys()) this.markLocal(id);
          this.refetch();
        } else {
          // the server says the socket is caught up: without a replay (first connect, or
          // no offset yet) or after a gap, what was missed comes from REST
          this.connection.settled();
          this.dataset.state = "live";
          if (!resumed || this.gapSeen || this.items.size === 0) this.refetch();
          this.gapSeen = false;
        }
        this.setUnread(frame.count);
        break;
      case "gap":
        this.gapSeen = true;
        break;
      default:
        break;
    }
  }

  /** The first page again, merged by id; the count from its X-Unread-Count. */
  async refetch() {
    try {
      const response = await this.connection.fetch(`/notifications/?type=in_app&limit=${PAGE}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const rows = await response.json();
      for (const row of rows) this.add(row, !row.is_read);
      for (const row of rows) if (row.is_read) this.markLocal(row.id); // read elsewhere
      if (!this.paged) {
        // the cursor of the first page only: later refetches must not rewind the scroll
        this.paged = true;
        this.next = nextLink(response.headers.get("Link"));
      }
      this.setUnread(Number(response.headers.get("X-Unread-Count") ?? this.unread));
      this.showStatus(this.items.size ? null : "empty");
    } catch {
      if (!this.items.size) this.showStatus("error");
    }
  }

  /** Sets the badge to the server's count after a quiet moment: a live event may arrive
   * before or after a count that already includes it. */
  reconcile() {
    clearTimeout(this.reconcileTimer);
    this.reconcileTimer = setTimeout(async () => {
      if (this.reconciling) {
        this.reconcileAgain = true;
        return;
      }
      this.reconciling = true;
      try {
        do {
          this.reconcileAgain = false;
          const response = await this.connection.fetch("/notifications/?type=in_app&limit=1");
          if (response.ok && !this.reconcileAgain) {
            this.setUnread(Number(response.headers.get("X-Unread-Count")));
          }
        } while (this.reconcileAgain);
      } catch {
        /* the next event or reconnect reconciles */
      } finally {
        this.reconciling = false;
      }
    }, 300);
  }

  async loadMore() {
    if (!this.next || this.loadingPage || this.panel.hidden) return;
    this.loadingPage = true;
    try {
      const url = new URL(this.next, this.connection.base() + "/").toString();
      const response = await this.connection.fetch(url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      for (const row of await response.json()) this.add(row, !row.is_read);
      this.next = nextLink(response.headers.get("Link"));
    } catch {
      /* tried again at the next scroll */
    } finally {
      this.loadingPage = false;
    }
  }

  /** Adds one notification (a REST row or a live event); false when it is already shown. */
  add(data, unread) {
    if (this.items.has(data.id)) return false;
    const entry = {
      id: data.id,
      subject: data.subject || "",
      message: data.message || "",
      created_at: data.created_at,
      unread: unread && !data.is_read,
      element: null,
    };
    this.items.set(data.id, entry);
    this.place(entry);
    this.showStatus(null);
    return true;
  }

  /** Puts an entry's element where its id sorts (UUIDv7: newest first). */
  place(entry) {
    const element = entry.element || (entry.element = this.build(entry));
    // the common cases (newest at the top, older pages at the end) cost no search
    const first = this.list.firstElementChild;
    const last = this.list.lastElementChild;
    if (!first || first.dataset.id < entry.id) return this.list.prepend(element);
    if (last.dataset.id > entry.id) return this.list.append(element);
    for (const child of this.list.children) {
      if (child.dataset.id < entry.id) return this.list.insertBefore(element, child);
    }
    return this.list.append(element);
  }

  redraw() {
    this.list.replaceChildren();
    const sorted = [...this.items.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
    for (const entry of sorted) this.list.append((entry.element = this.build(entry)));
    this.setUnread(this.unread);
  }

  build(entry) {
    const li = document.createElement("li");
    li.dataset.id = entry.id;
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-expanded", "false");
    const subject = document.createElement("span");
    subject.className = "subject";
    subject.textContent = entry.subject;
    const message = document.createElement("span");
    message.className = "message";
    message.textContent = entry.message;
    const time = document.createElement("time");
    time.dateTime = entry.created_at;
    time.textContent = relativeTime(entry.created_at, this.getAttribute("locale"));
    const state = document.createElement("span");
    state.className = "sr";
    button.append(subject, message, time, state);
    button.addEventListener("click", () => this.open(entry));
    li.append(button);
    this.paint(entry, li);
    return li;
  }

  paint(entry, li = entry.element) {
    if (!li) return;
    li.setAttribute("part", entry.unread ? "item unread" : "item");
    li.toggleAttribute("data-unread", entry.unread);
    li.querySelector(".sr").textContent = entry.unread ? `, ${this.t.unread}` : "";
  }

  /** Opening an item shows all of it and marks it read. */
  async open(entry) {
    const li = entry.element;
    const opened = !li.hasAttribute("data-open");
    li.toggleAttribute("data-open", opened);
    li.firstElementChild.setAttribute("aria-expanded", String(opened));
    if (!entry.unread) return;
    this.markLocal(entry.id);
    await this.markRead({ ids: [entry.id] });
    this.dispatchEvent(new CustomEvent("notifyd-open", { detail: { id: entry.id } }));
  }

  markLocal(id) {
    const entry = this.items.get(id);
    if (!entry || !entry.unread) return;
    entry.unread = false;
    this.paint(entry);
  }

  async markAll() {
    for (const id of this.items.keys()) this.markLocal(id);
    await this.markRead({ all: true });
  }

  async markRead(body) {
    try {
      const response = await this.connection.fetch("/notifications/mark-as-read/", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.ok) this.setUnread((await response.json()).unread_count);
    } catch {
      this.reconcile();
    }
  }

  setUnread(count) {
    if (!Number.isFinite(count) || count < 0) return;
    this.unread = count;
    if (!this.badge) return;
    this.badge.textContent = String(count);
    this.badge.hidden = count === 0;
    this.bell.setAttribute("aria-label", this.t.bell(count));
  }

  toggle(open = this.panel.hidden) {
    this.panel.hidden = !open;
    this.bell.setAttribute("aria-expanded", String(open));
    // the next page comes when the list's end scrolls into view (the IntersectionObserver)
    if (open) this.panel.focus();
  }

  showStatus(kind) {
    if (!this.status) return;
    this.status.textContent = kind ? this.t[kind] : "";
  }

  updateTimes() {
    const locale = this.getAttribute("locale");
    for (const time of this.shadowRoot.querySelectorAll("time")) {
      time.textContent = relativeTime(time.dateTime, locale);
    }
  }
}

if (!customElements.get("notifyd-inbox")) customElements.define("notifyd-inbox", NotifydInbox);
