// progress-relay.js: the browser client of progress-relay.
//
// One ES module, no build step, no dependencies. It keeps one WebSocket to the relay,
// subscribes topics and patterns, reconnects with exponential backoff and jitter, resumes
// every topic from its epoch and last seq (so no event is lost or repeated across a
// reconnect), refreshes the token before it expires, and notices a dead connection. When the
// relay resets a live topic (a second `subscribed` frame: cluster mode lost or rolled back the
// topic), the client takes the new epoch and seq and tells the app with a `reset` status.
//
//   import { ProgressRelay } from './progress-relay.js';
//   const relay = new ProgressRelay('/ws', { getToken: () => fetch('/relay-token').then(r => r.json()) });
//   relay.on('state', (s) => console.log(s.state));
//   const stop = relay.subscribe('task:42', (event) => console.log(event.seq, event.type));
//
// The token travels in the WebSocket subprotocol (`progress-relay.v1`, `bearer.<JWT>`), never in
// the URL, which proxies write to their logs; `tokenTransport: 'query'` puts it in `?token=`
// instead, for relays older than the subprotocol.
//
// `transport: 'auto'` (the default) falls back to server-sent events (GET /sse, one EventSource
// per subscription) when WebSocket handshakes keep failing while the host answers HTTP (a proxy
// that refuses upgrades); 'websocket' and 'sse' force one. The README says what each costs.
//
// The wire protocol is the relay's (README, "Delivery: WebSocket at GET /ws"); this file's
// README (clients/js/README.md) says what the client guarantees.

/** Close codes the relay sends, and 1006 (the browser's "no close frame"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  /** Over the relay's operation rate (100 a second): retried with backoff, but the app sends too much. */
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
});

/** The subprotocol the relay selects; the token is offered beside it as `bearer.<JWT>`. */
export const SUBPROTOCOL = 'progress-relay.v1';

/** Characters a subprotocol name may hold (an HTTP token, RFC 9110): a compact JWT uses only these. */
const SUBPROTOCOL_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** Close codes after which reconnecting cannot help (the relay's table: "fix the client"). */
const FATAL_CLOSE = new Set([1002, 1003, 1007, 1009, 4403]);

const DEFAULTS = Object.freeze({
  pingInterval: 25000,   // ms between {"op":"ping"} when nothing else arrived; 0 turns heartbeats off
  minDelay: 500,         // first reconnect delay, ms (before jitter)
  maxDelay: 30000,       // longest reconnect delay, ms
  connectTimeout: 10000, // a handshake not finished by then is given up and retried, ms
  refreshBefore: 30000,  // refresh at most this long before `exp` (and at 75 % of a short token's life), ms
  autoConnect: true,
  tokenTransport: 'protocol', // 'protocol': Sec-WebSocket-Protocol `bearer.<JWT>`; 'query': `?token=` in the URL
  transport: 'auto',     // 'auto': WebSocket, SSE when WebSocket handshakes keep failing; 'websocket'; 'sse'
  sseUrl: null,          // the relay's GET /sse URL; by default the WebSocket URL's `ws` segment replaced by `sse`
});

/** `transport: 'auto'`: this many WebSocket handshakes failing in a row, none ever opened, while the
 * relay's host answers HTTP, switch the client to server-sent events. */
const AUTO_FALLBACK_AFTER = 2;

const OPEN = 1; // WebSocket.OPEN, without needing the global at import time
const REFRESH_INTERVAL = 10000; // the relay's limit: one refresh per 10 s per connection

/**
 * A connection to one relay. See progress-relay.d.ts for the types and the README for the
 * guarantees.
 */
export class ProgressRelay {
  /**
   * @param {string | URL} url  the relay's WebSocket URL (`wss://host/ws`); `http(s):` and
   *   URLs relative to the page (`/ws`) are accepted too.
   * @param {object} options  `token` and/or `getToken`, plus the numbers in DEFAULTS.
   */
  constructor(url, options = {}) {
    if (!options || (!options.token && typeof options.getToken !== 'function')) {
      throw new TypeError('ProgressRelay: options.token or options.getToken is required');
    }
    this.url = toWebSocketURL(url);
    this.options = { ...DEFAULTS, ...options };
    if (this.options.tokenTransport !== 'protocol' && this.options.tokenTransport !== 'query') {
      throw new TypeError("ProgressRelay: options.tokenTransport must be 'protocol' or 'query'");
    }
    if (!['auto', 'websocket', 'sse'].includes(this.options.transport)) {
      throw new TypeError("ProgressRelay: options.transport must be 'auto', 'websocket' or 'sse'");
    }
    this._sseURL = toSseURL(this.url, this.options.sseUrl);
    /** 'websocket' or 'sse': the transport in use (auto starts with the WebSocket). */
    this._transport = this.options.transport === 'sse' ? 'sse' : 'websocket';
    this._announcedTransport = null;
    this._wsFailures = 0; // WebSocket handshakes failed in a row while the host answered HTTP, none ever opened
    this._wsFailureProbe = null; // auto: whether the host answered HTTP just after the last failed handshake
    this._wsEverOpened = false;
    /** SSE: the streams' shared state ({ token, opened }) while they run, else null */
    this._sse = null;
    /** @type {Map<string, {es: EventSource | null, opened: boolean}>} SSE: one stream per subscription */
    this._streams = new Map();
    this._token = options.token || null;
    this._tokenAt = this._token ? Date.now() : 0;
    this._getToken = typeof options.getToken === 'function' ? options.getToken : null;
    // Without an explicit pingInterval, the relay's own (`ping_interval` of the first
    // `subscribed` frame of a connection) replaces the default.
    this._pingIntervalSet = options.pingInterval !== undefined;
    this._needFreshToken = false;

    /** @type {Map<string, Sub>} subscriptions by topic or pattern, in the order made */
    this._subs = new Map();
    /** @type {Map<string, TopicRecord>} what this client has seen of each topic */
    this._topics = new Map();
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {Map<string, number>} topics unsubscribed on this connection, not yet answered */
    this._unsubscribing = new Map();

    this._state = 'idle';
    this._ws = null;
    this._generation = 0;
    this._attempt = 0;
    this._stopped = true;
    this._timers = { retry: 0, connect: 0, heartbeat: 0, refresh: 0 };
    this._lastHeard = 0;
    this._pingSentAt = 0;
    this._authError = null; // the relay's `unauthorized` message on the current connection
    this._refreshedExp = 0; // `exp` of the token the last refresh was to replace
    this._lastRefreshSent = 0; // when this connection last sent a refresh (Date.now())
    this._onOnline = () => {
      if (this._timers.retry) this._retryNow();
    };

    if (this.options.autoConnect) {
      // A microtask, so that handlers added right after `new` see the first state.
      queueMicrotask(() => {
        if (this._state === 'idle') this.connect();
      });
    }
  }

  // ------------------------------------------------------------------------------------------
  // public API

  /** `connecting`, `open` or `closed` (`idle` before the first connect). */
  get state() {
    return this._state;
  }

  /** `'websocket'` or `'sse'`: the transport in use (with `transport: 'auto'`, `'websocket'` until
   * it falls back). */
  get transport() {
    return this._transport;
  }

  /** The token in use (the newest one `getToken` gave). */
  get token() {
    return this._token;
  }

  /** Topics and patterns subscribed, in the order they were made. */
  get topics() {
    return [...this._subs.keys()];
  }

  /**
   * Registers `handler` for `name`: `state`, `subscription`, `error` or `token`.
   * Returns a function that removes it.
   */
  on(name, handler) {
    if (typeof handler !== 'function') throw new TypeError('ProgressRelay.on: handler must be a function');
    let set = this._handlers.get(name);
    if (!set) this._handlers.set(name, (set = new Set()));
    const entry = (...args) => handler(...args);
    set.add(entry);
    return () => set.delete(entry);
  }

  /**
   * Subscribes to a topic (`task:42`) or a pattern (`task:*`, `*`). `onEvent(event, info)` is
   * called for each event, in order, once; `options.onStatus(status)` for what happens to the
   * subscription. Returns a function that ends this listener (and the subscription, when it
   * was the last one).
   */
  subscribe(topic, onEvent, options = {}) {
    if (typeof topic !== 'string' || topic === '') throw new TypeError('ProgressRelay.subscribe: topic must be a non-empty string');
    if (typeof onEvent !== 'function') throw new TypeError('ProgressRelay.subscribe: onEvent must be a function');
    let sub = this._subs.get(topic);
    const isNew = !sub;
    if (isNew) {
      sub = {
        key: topic,
        pattern: topic.endsWith('*'),
        prefix: topic.endsWith('*') ? topic.slice(0, -1) : topic,
        listeners: new Set(),
        acked: false,
      };
      this._subs.set(topic, sub);
    }
    const listener = { onEvent, onStatus: typeof options.onStatus === 'function' ? options.onStatus : null, primed: false };
    sub.listeners.add(listener);
    // A new listener starts with the current state: the newest event of each topic it covers
    // that this connection has already seen (the relay does not send those again).
    queueMicrotask(() => this._prime(sub, listener));
    if (isNew && this._isOpen()) this._sendSubscribe(sub);
    if (!isNew && sub.acked && listener.onStatus && sub.lastStatus) {
      const status = { ...sub.lastStatus };
      queueMicrotask(() => this._call(listener.onStatus, status));
    }
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this._removeListener(sub, listener);
    };
  }

  /** Opens the connection (done by the constructor unless `autoConnect: false`). */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    this._attempt = 0;
    if (typeof addEventListener === 'function') addEventListener('online', this._onOnline);
    this._open();
  }

  /** Closes the connection for good (until `connect()`); subscriptions are kept. */
  close() {
    if (this._stopped && this._state === 'closed') return;
    this._stopped = true;
    if (typeof removeEventListener === 'function') removeEventListener('online', this._onOnline);
    this._dropSocket(CloseCode.NORMAL, 'client closed');
    this._clearTimer('retry');
    this._clearTimer('refresh');
    this._setState('closed', { reason: 'closed by the client' });
  }

  // ------------------------------------------------------------------------------------------
  // connection

  async _open() {
    const generation = ++this._generation;
    this._setState('connecting', { attempt: this._attempt });
    if (this._wsFailureProbe) {
      // A handshake failed: it counts towards the fallback only when the host answered plain HTTP
      // right after it (a proxy that refuses upgrades); when nothing answered, the relay is just
      // down (or starting), and the count starts again.
      const probe = this._wsFailureProbe;
      this._wsFailureProbe = null;
      const reachable = await probe;
      if (generation !== this._generation || this._stopped) return;
      this._wsFailures = reachable ? this._wsFailures + 1 : 0;
      if (this._transport === 'websocket' && this._wsFailures >= AUTO_FALLBACK_AFTER) {
        this._useTransport('sse', 'the WebSocket handshake failed ' + this._wsFailures + ' times while the host answered HTTP');
      }
    }
    let token;
    try {
      token = await this._tokenForConnect();
    } catch (error) {
      if (generation !== this._generation || this._stopped) return;
      if (error && error.fatal) return this._fail({ code: 'unauthorized', message: error.message });
      this._emit('error', { code: 'token', message: 'getToken failed: ' + describe(error), error });
      return this._scheduleRetry({});
    }
    if (generation !== this._generation || this._stopped) return;
    if (this._transport === 'sse') return this._openSse(token);

    const url = new URL(this.url.href);
    let protocols = null;
    if (this.options.tokenTransport === 'query') {
      url.searchParams.set('token', token);
    } else {
      // Out of the URL (proxies log URLs): offered as a subprotocol, which the relay never echoes.
      if (!SUBPROTOCOL_NAME.test(token)) {
        return this._fail({ code: 'unauthorized', message: "the token is not a compact JWT, so it cannot be offered as a subprotocol (tokenTransport: 'query' sends it in the URL)" });
      }
      protocols = [SUBPROTOCOL, 'bearer.' + token];
    }
    let ws;
    try {
      ws = protocols ? new WebSocket(url.href, protocols) : new WebSocket(url.href);
    } catch (error) {
      return this._fail({ code: 'bad_url', message: describe(error) });
    }
    this._ws = ws;
    this._authError = null;
    let opened = false;
    this._setTimer('connect', this.options.connectTimeout, () => {
      if (this._ws === ws && ws.readyState !== OPEN) {
        if (!opened) this._handshakeFailed();
        this._dropSocket();
        this._scheduleRetry({ reason: 'handshake timed out' });
      }
    });
    ws.onopen = () => {
      if (this._ws !== ws) return;
      opened = true;
      this._wsEverOpened = true;
      this._wsFailures = 0;
      this._clearTimer('connect');
      this._lastHeard = Date.now();
      this._pingSentAt = 0;
      this._lastRefreshSent = 0;
      this._setState('open', { attempt: this._attempt });
      this._announceTransport();
      this._unsubscribing.clear();
      // Topics first, with their resume points, then patterns: a pattern's snapshot then
      // finds the topics' events already delivered and adds nothing twice.
      for (const sub of this._subs.values()) if (!sub.pattern) this._sendSubscribe(sub);
      for (const sub of this._subs.values()) if (sub.pattern) this._sendSubscribe(sub);
      this._startHeartbeat();
      this._scheduleRefresh();
    };
    ws.onmessage = (message) => {
      if (this._ws !== ws) return;
      this._lastHeard = Date.now();
      if (typeof message.data === 'string') this._onFrame(message.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      if (!opened) this._handshakeFailed();
      this._stopConnectionTimers();
      this._onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // a close event follows, with the code
  }

  // ------------------------------------------------------------------------------------------
  // server-sent events (GET /sse): one EventSource per subscription, each with its own
  // credentials (a one-time ticket, or ?token= with tokenTransport 'query') and resume point
  // (?epoch=&since=). The client reconnects them itself (it closes an EventSource on its first
  // error), so that each new stream carries a fresh ticket and the client's own resume point.
  // The streams of one "connection" live and die together: one failing reconnects them all.

  /** `transport: 'auto'`, no WebSocket opened yet: asks at once whether the host answers HTTP
   * (the next attempt reads the answer). */
  _handshakeFailed() {
    if (this.options.transport !== 'auto' || this._wsEverOpened || this._transport !== 'websocket') return;
    this._wsFailureProbe = httpReachable(new URL('healthz', this._sseURL));
  }

  _useTransport(transport, reason) {
    if (this._transport === transport) return;
    this._transport = transport;
    this._announceTransport(reason);
  }

  _announceTransport(reason) {
    if (this._announcedTransport === this._transport) return;
    this._announcedTransport = this._transport;
    const value = { transport: this._transport };
    if (reason) value.reason = reason;
    this._emit('transport', value);
  }

  _openSse(token) {
    const sse = { token, opened: false };
    this._sse = sse;
    this._authError = null;
    if (this._subs.size === 0) return this._sseOpened(sse);
    this._setTimer('connect', this.options.connectTimeout, () => {
      if (this._sse === sse && !sse.opened) this._sseFailed(undefined, 'handshake timed out');
    });
    // Topics first, with their resume points, then patterns (as on the WebSocket).
    for (const sub of this._subs.values()) if (!sub.pattern) this._sendSubscribe(sub);
    for (const sub of this._subs.values()) if (sub.pattern) this._sendSubscribe(sub);
  }

  _sseOpened(sse) {
    if (sse.opened) return;
    sse.opened = true;
    this._clearTimer('connect');
    this._setState('open', { attempt: this._attempt });
    this._announceTransport();
    this._scheduleRefresh();
  }

  /** Opens the stream of `sub` (closing the one it had), from `message`'s resume point. */
  async _openStream(sub, message) {
    const sse = this._sse;
    if (!sse) return;
    this._closeStream(sub.key);
    const entry = { es: null, opened: false };
    this._streams.set(sub.key, entry);
    const stale = () => this._sse !== sse || this._streams.get(sub.key) !== entry;
    const url = new URL(this._sseURL.href);
    url.searchParams.set('topic', sub.key);
    if (message.epoch !== undefined) {
      url.searchParams.set('epoch', message.epoch);
      url.searchParams.set('since', String(message.since));
    }
    try {
      // A ticket is bound to the Origin its POST carried, and an EventSource sends `Origin` only
      // across origins: a page on the relay's own origin (the live page) puts the token in the URL.
      if (this.options.tokenTransport === 'query' || sameOrigin(this._sseURL)) url.searchParams.set('token', sse.token);
      else url.searchParams.set('ticket', await fetchTicket(new URL('ticket', this._sseURL), sse.token));
    } catch (error) {
      if (stale()) return;
      if (error && error.status === 401) return this._sseUnauthorized(error.relayMessage || describe(error));
      return this._sseFailed(undefined, 'ticket: ' + describe(error));
    }
    if (stale()) return;
    let es;
    try {
      es = new EventSource(url.href);
    } catch (error) {
      return this._fail({ code: 'bad_url', message: describe(error) });
    }
    entry.es = es;
    es.onopen = () => {
      if (stale()) return;
      entry.opened = true;
      this._sseOpened(sse);
    };
    es.onmessage = (message) => {
      if (!stale() && typeof message.data === 'string') this._onFrame(message.data);
    };
    es.addEventListener('subscribed', (message) => {
      if (!stale() && typeof message.data === 'string') this._onFrame(message.data);
    });
    es.addEventListener('error', (event) => {
      if (stale() || entry.es !== es) return;
      if (typeof event.data === 'string') {
        // `event: error`: the relay's error frame (the token expired); it closes next.
        this._onFrame(event.data);
        let frame = null;
        try {
          frame = JSON.parse(event.data);
        } catch (_) {
          /* not JSON */
        }
        if (frame && frame.code === 'unauthorized') return this._sseFailed(CloseCode.UNAUTHORIZED, frame.message || 'unauthorized');
        return;
      }
      // The stream ended (a relay restart, a lost connection): reconnect every stream, from the
      // client's own resume points.
      if (entry.opened) return this._sseFailed(undefined, 'stream ended');
      // It failed before it opened: refused, or the relay unreachable. An EventSource cannot
      // read the status, so the client asks again with fetch, which can; meanwhile the
      // EventSource is closed, so that the browser does not retry it on its own.
      es.onopen = es.onmessage = null;
      es.close();
      entry.es = null;
      this._whyRefused(url, sse.token).then((refusal) => {
        if (!stale()) this._streamRefused(sub, sse, refusal);
      });
    });
  }

  /**
   * Asks the relay for the stream at `streamURL` again, with fetch: `{status, code, message}`
   * (`code` and `message` from the relay's JSON body, when it has one), or null when nothing
   * answered in time. A stream that opens this time is aborted at once (its headers are all it
   * takes). A ticket was used by the stream that failed: the question goes with a new one,
   * whose POST answers 401 itself when the token is refused. (The token in `Authorization`
   * instead would need a CORS preflight, which `/sse` does not answer, and in the URL it would
   * defeat the ticket.)
   */
  async _whyRefused(streamURL, token) {
    const url = new URL(streamURL.href);
    const controller = typeof AbortController === 'function' ? new AbortController() : null;
    const signal = controller ? controller.signal : undefined;
    const timer = setTimeout(() => controller && controller.abort(), this.options.connectTimeout);
    try {
      if (url.searchParams.has('ticket')) {
        try {
          url.searchParams.set('ticket', await fetchTicket(new URL('ticket', this._sseURL), token, signal));
        } catch (error) {
          if (error && error.status === 401) return { status: 401, code: 'unauthorized', message: error.relayMessage || describe(error) };
          return null;
        }
      }
      // `Accept` is a header a simple cross-origin GET may carry: no preflight.
      const response = await fetch(url.href, { headers: { Accept: 'text/event-stream' }, cache: 'no-store', signal });
      if (response.ok) return { status: response.status, code: null, message: null };
      const body = await relayErrorBody(response);
      return { status: response.status, code: body.code, message: body.message };
    } catch (_) {
      return null; // nothing answered (or not in time), or a proxy's answer without CORS headers
    } finally {
      clearTimeout(timer);
      if (controller) controller.abort();
    }
  }

  /** What a stream refused before it opened becomes: the WebSocket's equivalents. */
  _streamRefused(sub, sse, refusal) {
    const status = refusal ? refusal.status : 0;
    if (status === 401) return this._sseUnauthorized(refusal.message || 'token refused');
    if (status === 403 || (status === 400 && refusal.code)) {
      // As the relay's error frame for a subscribe it refuses (`forbidden`,
      // `too_many_subscriptions`, `bad_request`): that subscription ends, the others go on.
      this._onError({ code: refusal.code || (status === 403 ? 'forbidden' : 'bad_request'), message: refusal.message || 'HTTP ' + status, topic: sub.key });
      // The "connection" is open once no stream is pending (on a WebSocket it opened before the
      // refusal): with none left, it is open with no subscription, as a WebSocket would be.
      if (this._sse === sse && [...this._streams.values()].every((e) => e.opened)) this._sseOpened(sse);
      return;
    }
    // Unreachable, a server error, a limit (429, 503), or a stream that opens now: reconnect
    // every stream with backoff, as after a WebSocket that closed with no code.
    this._sseFailed(undefined, status ? 'stream refused: HTTP ' + status : 'stream refused or unreachable');
  }

  /** The relay refused the token (a 401 to `/sse` or `POST /ticket`): as its `unauthorized`
   * error frame and close 4401 on a WebSocket. With getToken, a fresh token and a reconnect
   * (with backoff when that one is refused too); without, the client stops. */
  _sseUnauthorized(message) {
    this._onError({ code: 'unauthorized', message });
    this._sseFailed(CloseCode.UNAUTHORIZED, message);
  }

  _closeStream(key) {
    const entry = this._streams.get(key);
    if (!entry) return;
    this._streams.delete(key);
    if (entry.es) {
      entry.es.onopen = entry.es.onmessage = null;
      entry.es.close();
    }
  }

  _dropStreams() {
    this._sse = null;
    for (const key of [...this._streams.keys()]) this._closeStream(key);
  }

  /** Every stream is dropped and the client reconnects (as after a WebSocket close with `code`). */
  _sseFailed(code, reason) {
    this._dropSocket();
    this._onClose(code, reason);
  }

  /** The token to connect with: a fresh one after 4401, or when the current one has expired. */
  async _tokenForConnect() {
    const claims = decodeJwtPayload(this._token);
    const expired = claims && typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now() + 1000;
    if (this._token && !this._needFreshToken && !(expired && this._getToken)) return this._token;
    if (!this._getToken) {
      const error = new Error(this._token ? 'the token was refused or has expired, and there is no getToken' : 'no token');
      error.fatal = true;
      throw error;
    }
    const token = tokenOf(await this._getToken());
    if (!token) throw new Error('getToken returned no token');
    this._adoptToken(token);
    this._needFreshToken = false;
    return token;
  }

  _adoptToken(token) {
    this._token = token;
    this._tokenAt = Date.now();
    const claims = decodeJwtPayload(token);
    this._emit('token', { token, exp: claims && typeof claims.exp === 'number' ? claims.exp : null });
  }

  _onClose(code, reason) {
    if (this._stopped) return this._setState('closed', { code, reason });
    if (code === CloseCode.UNAUTHORIZED) {
      if (!this._getToken) {
        return this._fail({ code: 'unauthorized', closeCode: code, message: this._authError || reason || 'token refused' });
      }
      this._needFreshToken = true;
    }
    if (FATAL_CLOSE.has(code)) {
      return this._fail({ code: code === CloseCode.FORBIDDEN ? 'forbidden' : 'protocol', closeCode: code, message: reason || 'closed with ' + code });
    }
    this._scheduleRetry({ code, reason });
  }

  _fail(error) {
    this._stopped = true;
    this._dropSocket();
    this._clearTimer('retry');
    this._clearTimer('refresh');
    this._emit('error', { ...error, fatal: true });
    this._setState('closed', { code: error.closeCode, reason: error.message, fatal: true });
  }

  _scheduleRetry({ code, reason }) {
    if (this._stopped) return;
    const delay = backoffDelay(this._attempt, this.options.minDelay, this.options.maxDelay);
    this._attempt += 1;
    this._setState('connecting', { attempt: this._attempt, delay, code, reason });
    this._setTimer('retry', delay, () => this._open());
  }

  _retryNow() {
    this._clearTimer('retry');
    this._open();
  }

  /** Forgets the socket at once (its late events are ignored) and closes it. */
  _dropSocket(code = CloseCode.NORMAL, reason = '') {
    this._dropStreams();
    const ws = this._ws;
    this._ws = null;
    this._generation += 1;
    this._stopConnectionTimers();
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch (_) {
      /* already closing */
    }
  }

  _stopConnectionTimers() {
    this._clearTimer('connect');
    this._clearTimer('heartbeat');
    this._clearTimer('refresh');
  }

  _isOpen() {
    if (this._transport === 'sse') return !!this._sse && !this._stopped;
    return !!this._ws && this._ws.readyState === OPEN && this._state === 'open';
  }

  _send(message) {
    if (!this._ws || this._ws.readyState !== OPEN) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  // ------------------------------------------------------------------------------------------
  // heartbeat: the browser answers the relay's ping frames but does not show them to pages, so
  // the client sends {"op":"ping"} when it heard nothing for half an interval, and declares the
  // connection dead when nothing at all arrived for two intervals while a ping was unanswered.

  _startHeartbeat() {
    const interval = this.options.pingInterval;
    if (!(interval > 0) || this._transport === 'sse') return; // SSE: the relay's `: ping` lines are not visible to pages
    const tick = () => {
      if (!this._isOpen()) return;
      const now = Date.now();
      const idle = now - this._lastHeard;
      const unanswered = this._pingSentAt > this._lastHeard;
      if (unanswered && idle >= 2 * interval && now - this._pingSentAt >= interval / 2) {
        this._dropSocket(CloseCode.NORMAL, 'no answer');
        this._scheduleRetry({ reason: 'connection dead: nothing received for ' + Math.round(idle / 1000) + ' s' });
        return;
      }
      if (!unanswered && idle >= interval / 2) {
        this._pingSentAt = now;
        this._send({ op: 'ping' });
      }
      this._setTimer('heartbeat', interval / 2, tick);
    };
    this._setTimer('heartbeat', interval / 2, tick);
  }

  /** The relay's `--ping-interval` (seconds), told in a connection's first `subscribed` frame:
   * used unless the app set `pingInterval` itself. */
  _adoptPingInterval(seconds) {
    if (this._pingIntervalSet || typeof seconds !== 'number' || !(seconds > 0) || !isFinite(seconds)) return;
    const ms = seconds * 1000;
    if (ms === this.options.pingInterval) return;
    this.options.pingInterval = ms;
    if (this._isOpen()) this._startHeartbeat();
  }

  // ------------------------------------------------------------------------------------------
  // token refresh: at min(refreshBefore, a quarter of the token's life) before `exp`, measured
  // both on this clock and from the moment the token arrived (`exp - iat`), whichever is sooner,
  // so that a browser clock that runs late does not miss the expiry.

  _scheduleRefresh() {
    this._clearTimer('refresh');
    if (!this._getToken || !(this.options.refreshBefore > 0) || !this._isOpen()) return;
    const claims = decodeJwtPayload(this._token);
    if (!claims || typeof claims.exp !== 'number') return;
    const now = Date.now();
    let left = claims.exp * 1000 - now;
    let life = left;
    if (typeof claims.iat === 'number' && claims.exp > claims.iat) {
      life = (claims.exp - claims.iat) * 1000;
      left = Math.min(left, life - (now - this._tokenAt));
    }
    const lead = Math.min(this.options.refreshBefore, life / 4);
    let delay = Math.max(0, left - lead);
    if (this._refreshedExp && claims.exp <= this._refreshedExp) {
      // getToken gave back a token that lasts no longer than the one it was to replace: ask
      // again a little later rather than at once, and stop when it is about to expire.
      if (left < 2000) return;
      delay = Math.max(delay, Math.min(5000, left / 2));
    }
    this._setTimer('refresh', delay, () => this._refresh(claims.exp));
  }

  async _refresh(oldExp) {
    const generation = this._generation;
    this._refreshedExp = oldExp;
    let token;
    try {
      token = tokenOf(await this._getToken());
      if (!token) throw new Error('getToken returned no token');
    } catch (error) {
      if (generation !== this._generation || this._stopped) return;
      this._emit('error', { code: 'token', message: 'getToken failed: ' + describe(error), error });
      // Try again while the token lasts; after it, the relay closes with 4401 and the
      // reconnect asks getToken again.
      const left = oldExp * 1000 - Date.now();
      if (left > 2000) this._setTimer('refresh', Math.min(5000, left / 2), () => this._refresh(oldExp));
      return;
    }
    if (this._stopped) return;
    this._adoptToken(token);
    if (generation !== this._generation || !this._isOpen()) return;
    if (this._transport === 'sse') return this._refreshStreams();
    this._sendRefresh(generation);
  }

  /** SSE has no refresh: each stream is opened again with the new token, from its resume point. */
  _refreshStreams() {
    this._sse.token = this._token;
    for (const sub of this._subs.values()) if (!sub.pattern) this._sendSubscribe(sub);
    for (const sub of this._subs.values()) if (sub.pattern) this._sendSubscribe(sub);
    const claims = decodeJwtPayload(this._token);
    this._emit('token', { token: this._token, exp: claims && typeof claims.exp === 'number' ? claims.exp : null, refreshed: true });
    this._scheduleRefresh();
  }

  /** The relay takes at most one refresh per 10 s per connection: a refresh that would come
   * sooner (a token living under about 13 s) waits for its turn. */
  _sendRefresh(generation) {
    const wait = this._lastRefreshSent ? REFRESH_INTERVAL - (Date.now() - this._lastRefreshSent) : 0;
    if (wait > 0) {
      this._setTimer('refresh', wait, () => {
        if (generation === this._generation && this._isOpen()) this._sendRefresh(generation);
      });
      return;
    }
    this._lastRefreshSent = Date.now();
    this._send({ op: 'refresh', token: this._token });
  }

  // ------------------------------------------------------------------------------------------
  // frames

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    if (typeof frame.op !== 'string') {
      this._attempt = 0;
      return this._onEvent(frame, text);
    }
    switch (frame.op) {
      case 'subscribed':
        this._attempt = 0;
        return this._onSubscribed(frame);
      case 'unsubscribed':
        return this._onUnsubscribed(frame);
      case 'refreshed':
        this._attempt = 0;
        this._emit('token', { token: this._token, exp: typeof frame.exp === 'number' ? frame.exp : null, refreshed: true });
        return this._scheduleRefresh();
      case 'pong':
        this._attempt = 0;
        return;
      case 'error':
        return this._onError(frame);
      default:
        return;
    }
  }

  _sendSubscribe(sub) {
    const message = { op: 'subscribe', topic: sub.key };
    sub.acked = false;
    sub.resumed = false;
    if (!sub.pattern) {
      const record = this._topics.get(sub.key);
      if (record && record.epoch !== null) {
        message.epoch = record.epoch;
        // The last seq delivered. Right after a renumbering whose newest event has not arrived
        // yet, the one before it, so that the relay sends that event.
        message.since = record.gapPending && record.newestFollows && record.seq > 0 ? record.seq - 1 : record.seq;
        sub.resumed = true;
      }
    }
    if (this._transport === 'sse') this._openStream(sub, message);
    else this._send(message);
  }

  _onSubscribed(frame) {
    const sub = this._subs.get(frame.topic);
    if (!sub) return;
    // The subscription this frame belongs to was ended by our unsubscribe (not answered yet):
    // a late reset of it, not the answer to a newer subscribe, which comes after `unsubscribed`.
    if (this._unsubscribing.has(frame.topic)) return;
    this._adoptPingInterval(frame.ping_interval);
    const epoch = typeof frame.epoch === 'string' ? frame.epoch : null;
    const seq = typeof frame.seq === 'number' ? frame.seq : 0;
    // A second `subscribed` for a live subscription: the relay reset the topic's stream.
    if (sub.acked) return this._onReset(sub, epoch, seq);
    sub.acked = true;
    if (!sub.pattern && epoch !== null) {
      const record = this._record(frame.topic);
      // Another numbering: the relay lost its state or forgot the topic.
      const renumbered = record.epoch !== null ? record.epoch !== epoch : record.seq > seq;
      if (renumbered && (record.seq > 0 || record.text !== null)) this._renumber(record, epoch, seq, true);
      record.epoch = epoch;
    }
    const status = {
      status: 'subscribed',
      topic: frame.topic,
      epoch,
      seq,
      recovered: frame.recovered === true,
      resumed: !!sub.resumed,
    };
    sub.lastStatus = status;
    this._status(sub, status);
  }

  /**
   * The relay reset a live topic (cluster mode: Redis lost or may have rolled back the topic, or
   * a gap could not be repaired from history): its stream now stands at `epoch`, `seq`, and the
   * events of the new numbering the relay holds follow (seq `seq` + 1 onwards). The client takes
   * that numbering, so that the next resume uses it, and tells the app.
   */
  _onReset(sub, epoch, seq) {
    if (sub.pattern || epoch === null) return; // a pattern has no numbering to reset
    const record = this._record(sub.key);
    const previousEpoch = record.epoch;
    const previousSeq = record.seq;
    if (record.epoch !== epoch || record.seq !== seq) this._renumber(record, epoch, seq, false);
    const status = { status: 'reset', topic: sub.key, epoch, seq, recovered: false, previousEpoch, previousSeq };
    // A listener added later starts from the stream as it now stands.
    sub.lastStatus = { ...(sub.lastStatus || { status: 'subscribed', topic: sub.key, resumed: false }), epoch, seq, recovered: false };
    this._status(sub, status);
  }

  /** The topic's numbering is now `epoch`, standing at `seq`: the next event is delivered with
   * `gap`; events of the old numbering are forgotten, so their seqs are no reason to drop the new
   * ones. `newestFollows`: the answer to a subscribe, whose newest event (at `seq` itself)
   * follows; a reset is followed by the events after `seq`. */
  _renumber(record, epoch, seq, newestFollows) {
    record.epoch = epoch;
    record.seq = seq;
    record.text = null;
    record.gapPending = true;
    record.newestFollows = newestFollows;
  }

  _onUnsubscribed(frame) {
    // An answer to our own unsubscribe needs nothing; one with a reason is the relay's doing
    // (a refreshed token no longer covers the topic).
    if (!frame.reason) {
      const pending = this._unsubscribing.get(frame.topic);
      if (pending > 1) this._unsubscribing.set(frame.topic, pending - 1);
      else this._unsubscribing.delete(frame.topic);
      return;
    }
    const sub = this._subs.get(frame.topic);
    if (!sub) return;
    this._status(sub, { status: 'ended', topic: frame.topic, reason: frame.reason });
    this._endSub(sub);
  }

  _onError(frame) {
    if (frame.code === 'unauthorized') this._authError = typeof frame.message === 'string' ? frame.message : null;
    const error = { code: frame.code, message: frame.message };
    if (typeof frame.topic === 'string') error.topic = frame.topic;
    const sub = typeof frame.topic === 'string' ? this._subs.get(frame.topic) : null;
    if (sub && frame.code !== 'unauthorized') {
      // forbidden, too_many_subscriptions, bad_request: the subscription ends.
      this._status(sub, { status: 'error', topic: frame.topic, code: frame.code, message: frame.message });
      this._endSub(sub);
    }
    this._emit('error', error);
  }

  _onEvent(event, text) {
    const topic = event.topic;
    const seq = event.seq;
    if (typeof topic !== 'string' || typeof seq !== 'number') return;
    let covered = false;
    for (const sub of this._subs.values()) if (covers(sub, topic)) covered = true;
    if (!covered) return; // a late event of a subscription just ended
    const record = this._record(topic);
    let gap = false;
    if (record.seq > 0 || record.gapPending) {
      // After a renumbering (a new epoch, or a reset), the first event may carry the seq the
      // relay announced: the topic's newest event, not a repeat.
      const announced = record.gapPending && record.newestFollows && seq === record.seq;
      if (seq <= record.seq && !announced) {
        // Seen already, unless the numbering started again. With the topic's epoch known
        // (a topic subscription) that would have come with a new epoch; through a pattern
        // only, an older or different event at the same seq means a new numbering.
        if (record.epoch !== null) return;
        if (seq === record.seq && text === record.text) return;
        gap = true;
      } else if (seq !== record.seq + 1 && !announced) {
        gap = true;
      }
      if (record.gapPending) gap = true;
    }
    record.gapPending = false;
    record.seq = seq;
    record.text = text;
    record.event = event;
    for (const sub of this._subs.values()) {
      if (!covers(sub, topic)) continue;
      for (const listener of sub.listeners) {
        if (!listener.primed) continue; // its microtask delivers the newest event first
        this._call(listener.onEvent, event, { topic, seq, gap, subscription: sub.key, cached: false });
      }
    }
  }

  _prime(sub, listener) {
    if (listener.primed || !sub.listeners.has(listener)) return;
    listener.primed = true;
    for (const [topic, record] of this._topics) {
      if (record.event && covers(sub, topic)) {
        this._call(listener.onEvent, record.event, { topic, seq: record.event.seq, gap: false, subscription: sub.key, cached: true });
      }
    }
  }

  // ------------------------------------------------------------------------------------------
  // bookkeeping

  _record(topic) {
    let record = this._topics.get(topic);
    if (!record) {
      record = { epoch: null, seq: 0, text: null, event: null, gapPending: false };
      this._topics.set(topic, record);
    }
    return record;
  }

  _removeListener(sub, listener) {
    sub.listeners.delete(listener);
    if (sub.listeners.size > 0 || this._subs.get(sub.key) !== sub) return;
    if (this._isOpen() && this._send({ op: 'unsubscribe', topic: sub.key })) {
      this._unsubscribing.set(sub.key, (this._unsubscribing.get(sub.key) || 0) + 1);
    }
    this._endSub(sub);
  }

  _endSub(sub) {
    if (this._subs.get(sub.key) !== sub) return;
    this._subs.delete(sub.key);
    this._closeStream(sub.key);
    sub.listeners.clear();
    if (!sub.pattern) {
      const record = this._topics.get(sub.key);
      if (record) record.epoch = null; // only a topic subscription keeps the epoch current
    }
    // Forget topics no subscription covers any more.
    for (const topic of [...this._topics.keys()]) {
      let covered = false;
      for (const other of this._subs.values()) if (covers(other, topic)) covered = true;
      if (!covered) this._topics.delete(topic);
    }
  }

  _status(sub, status) {
    for (const listener of sub.listeners) if (listener.onStatus) this._call(listener.onStatus, status);
    this._emit('subscription', status);
  }

  _setState(state, detail = {}) {
    this._state = state;
    this._emit('state', { state, ...detail });
  }

  _emit(name, value) {
    const set = this._handlers.get(name);
    if (!set) return;
    for (const handler of [...set]) this._call(handler, value);
  }

  _call(fn, ...args) {
    try {
      fn(...args);
    } catch (error) {
      // A listener's exception must not break the connection: report it like an uncaught one.
      setTimeout(() => {
        throw error;
      });
    }
  }

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    this._timers[name] = setTimeout(() => {
      this._timers[name] = 0;
      fn();
    }, ms);
  }

  _clearTimer(name) {
    if (this._timers[name]) clearTimeout(this._timers[name]);
    this._timers[name] = 0;
  }
}

// --------------------------------------------------------------------------------------------
// helpers (exported for pages and tests)

/**
 * The delay before reconnect attempt `attempt` (0 for the first): `min(maxDelay,
 * minDelay * 2^attempt)`, with "equal jitter": a random point in its upper half.
 */
export function backoffDelay(attempt, minDelay = DEFAULTS.minDelay, maxDelay = DEFAULTS.maxDelay) {
  const ceiling = Math.min(maxDelay, minDelay * Math.pow(2, Math.min(attempt, 30)));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

/** The claims of a JWT (not verified: only to read `exp`, `sub` and `topics`), or null. */
export function decodeJwtPayload(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    let base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    base64 += '='.repeat((4 - (base64.length % 4)) % 4);
    const binary = atob(base64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch (_) {
    return null;
  }
}

/** Whether a grant or subscription `pattern` (`X`, or `P*`) covers `topic`. */
export function topicMatches(pattern, topic) {
  return pattern.endsWith('*') ? topic.startsWith(pattern.slice(0, -1)) : pattern === topic;
}

function covers(sub, topic) {
  return sub.pattern ? topic.startsWith(sub.prefix) : sub.key === topic;
}

function toWebSocketURL(url) {
  const base = typeof location !== 'undefined' && location.href ? location.href : undefined;
  const parsed = new URL(String(url), base);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  else if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError('ProgressRelay: the URL must be ws:, wss:, http: or https:');
  }
  parsed.searchParams.delete('token');
  return parsed;
}

/** The relay's GET /sse URL: `sseUrl`, else the WebSocket URL's last segment (`ws`) replaced by `sse`. */
function toSseURL(wsURL, sseUrl) {
  const base = typeof location !== 'undefined' && location.href ? location.href : undefined;
  if (sseUrl) {
    const parsed = new URL(String(sseUrl), base);
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new TypeError('ProgressRelay: sseUrl must be http: or https:');
    parsed.search = '';
    return parsed;
  }
  const http = new URL(wsURL.href);
  http.protocol = http.protocol === 'wss:' ? 'https:' : 'http:';
  http.search = '';
  http.hash = '';
  return new URL('sse', http);
}

/** Whether `url` is on the page's own origin. */
function sameOrigin(url) {
  return typeof location !== 'undefined' && typeof location.origin === 'string' && url.origin === location.origin;
}

/** Whether the host answers HTTP at all (any status): a network failure is false. */
async function httpReachable(url) {
  try {
    await fetch(url.href, { mode: 'no-cors', cache: 'no-store' });
    return true;
  } catch (_) {
    return false;
  }
}

/** A one-time ticket for `token` (POST /ticket), so that the token stays out of the URL. */
async function fetchTicket(url, token, signal) {
  const response = await fetch(url.href, { method: 'POST', headers: { Authorization: 'Bearer ' + token }, cache: 'no-store', signal });
  if (!response.ok) {
    const body = await relayErrorBody(response);
    const error = new Error('POST ' + url.pathname + ' answered ' + response.status + (body.message ? ': ' + body.message : ''));
    error.status = response.status;
    error.relayMessage = body.message;
    throw error;
  }
  const body = await response.json();
  if (!body || typeof body.ticket !== 'string') throw new Error('POST ' + url.pathname + ' gave no ticket');
  return body.ticket;
}

/** The relay's refusal body, `{"error": code, "message": …}`: `{code, message}`, null where absent. */
async function relayErrorBody(response) {
  let body = null;
  try {
    body = JSON.parse(await response.text());
  } catch (_) {
    /* not the relay's JSON (a proxy's page), or the body did not come */
  }
  const field = (name) => (body && typeof body === 'object' && typeof body[name] === 'string' ? body[name] : null);
  return { code: field('error'), message: field('message') };
}

/** getToken's answer: a token, or an object with `token` (the JSON a token endpoint answers,
 * `{"token": …}`); '' when it is neither. */
function tokenOf(value) {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof value.token === 'string') return value.token;
  return '';
}

function describe(error) {
  return error && error.message ? error.message : String(error);
}

/**
 * @typedef {{ key: string, pattern: boolean, prefix: string, listeners: Set<any>, acked: boolean,
 *   resumed?: boolean, lastStatus?: object }} Sub
 * @typedef {{ epoch: string | null, seq: number, text: string | null, event: object | null,
 *   gapPending: boolean }} TopicRecord
 */
