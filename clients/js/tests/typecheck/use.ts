// Compiled (not run) by test_types.py: progress-relay.d.ts describes the API the README shows.
import { ProgressRelay, CloseCode, SUBPROTOCOL, decodeJwtPayload, topicMatches, backoffDelay, TaskProgressEvent, RelayEvent, SubscriptionStatus } from '../../progress-relay';
const relay = new ProgressRelay('/ws', { getToken: async () => 'x', pingInterval: 1000 });
const off = relay.on('state', (s) => { const st: 'idle' | 'connecting' | 'open' | 'closed' = s.state; console.log(st, s.delay); });
relay.on('error', (e) => console.log(e.code, e.fatal));
relay.on('token', (t) => console.log(t.exp));
const stop = relay.subscribe<TaskProgressEvent>('task:1', (ev, info) => { const p: number | undefined = ev.progress; console.log(p, info.gap, ev.seq); }, {
  onStatus: (s: SubscriptionStatus) => { if (s.status === 'subscribed') console.log(s.recovered, s.resumed); else if (s.status === 'ended') console.log(s.reason); },
});
relay.on('subscription', (s) => {
  if (s.status === 'reset') { const e: string = s.epoch; const r: false = s.recovered; console.log(e, s.seq, r, s.previousEpoch, s.previousSeq); }
});
relay.subscribe('task:*', (ev: RelayEvent) => console.log(ev.topic));
stop(); off(); relay.close(); relay.connect();
const c: 4401 = CloseCode.UNAUTHORIZED;
console.log(decodeJwtPayload(relay.token), topicMatches('a*', 'ab'), backoffDelay(2), relay.topics, relay.url.href, c);
// @ts-expect-error an unknown event name
relay.on('nope', () => {});
// issue 14: the token's transport
const viaQuery = new ProgressRelay('/ws', { token: 'x', tokenTransport: 'query' });
const proto: 'progress-relay.v1' = SUBPROTOCOL;
console.log(viaQuery.state, proto);
// @ts-expect-error an unknown transport
new ProgressRelay('/ws', { token: 'x', tokenTransport: 'header' });
// issue 16: WebSocket or server-sent events
const viaSse = new ProgressRelay('/ws', { token: 'x', transport: 'sse', sseUrl: '/relay/sse' });
const t: 'websocket' | 'sse' = viaSse.transport;
viaSse.on('transport', (change) => { const used: 'websocket' | 'sse' = change.transport; console.log(used, change.reason, t); });
new ProgressRelay('/ws', { token: 'x', transport: 'auto' });
// @ts-expect-error an unknown transport
new ProgressRelay('/ws', { token: 'x', transport: 'long-poll' });
