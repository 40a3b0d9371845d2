// A Cloudflare-style worker answering chat/completions through unbusy: the busy primary's
// 503s, 429s and keep-alive stalls become answers from the backup. Deploy with wrangler
// (which resolves `unbusy` to its workerd build), or run it in workerd through miniflare as
// `make test` does. PRIMARY and BACKUP are the providers' base URLs (vars or secrets).
import { createFetch } from 'unbusy';

// One unbusy fetch per incoming request: the Workers runtime forbids one request's I/O
// (fetches, timers) from completing another request's promises, so the engine and its timers
// live with the request (retries, failover and deadlines all happen inside it).
export default {
  async fetch(request, env) {
    const unbusyFetch = createFetch({
      providers: [
        { name: 'primary', baseUrl: env.PRIMARY },
        { name: 'backup', baseUrl: env.BACKUP },
      ],
      deadlines: { firstTokenMs: 1500, responseMs: 3000, totalMs: 20000 },
    });
    const body = await request.text();
    return unbusyFetch(`${env.PRIMARY}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: request.headers.get('authorization') ?? '' },
      body,
      signal: request.signal,
    });
  },
};
