"""The scheduler: what runs in the next passes, for a batch of requests or a prefetch.

It never touches tensors. For each request it finds the deepest cached past
(:meth:`PrefixCache.deepest_kv`), splits what does not fit one pass into chunks, groups rows
into passes within the memory share (:meth:`KVStore.memory_groups`), and hands them to the
:class:`~genlm_bytes.lm.hf.passes.PassRunner`; a lone request goes to the
:class:`~genlm_bytes.lm.hf.speculation.Drafter` first, and a finished batch to the
:class:`~genlm_bytes.lm.hf.speculation.LookAhead`. Before planning, it checks the model
(:class:`~genlm_bytes.lm.hf.faithful.ModelWatch`): results cached before a change are dropped.

Everything here runs in the model's thread, under the batcher's lock.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class Scheduler:
    """Plans and runs the passes for batches of requests (:meth:`process`) and prefetches
    (:meth:`prefetch`).

    Args:
        runner: the :class:`~genlm_bytes.lm.hf.passes.PassRunner`.
        drafter: the :class:`~genlm_bytes.lm.hf.speculation.Drafter`.
        ahead: the :class:`~genlm_bytes.lm.hf.speculation.LookAhead`.
    """

    def __init__(self, runner, drafter, ahead):
        self.runner, self.drafter, self.ahead = runner, drafter, ahead
        self.store, self.cache, self.config, self.watch = runner.store, runner.cache, runner.config, runner.watch
        self.hints: tuple = ()  # contexts a caller said it will likely ask for next (see AsyncLM.hint_next)

    def check_model(self) -> None:
        """Before planning: if the model changed since the last pass (hooks, modules, weights),
        drop every cached result and past (they were computed by the model before)."""
        if self.watch.refresh():
            logger.info("the model changed (hooks, modules or weights): cached results dropped")
            self.cache.clear()

    @torch.inference_mode()
    def process(self, requests: list[tuple[tuple, bool]]) -> list[torch.Tensor]:
        """Run a batch of ``(context, may guess)`` requests. Returns one (V,) log-prob row each."""
        self.check_model()
        cache, kv_reuse = self.cache, self.store.kv_reuse
        rows = []
        for ids, _ in requests:
            hit = cache.get_logp(ids, held=True)
            if hit is not None:  # computed by an earlier batch while this one waited
                rows.append((ids, None, 0, hit))
                continue
            past_len, ref = cache.deepest_kv(ids, len(ids) - 1) if kv_reuse else (0, None)
            past_len, ref = self.run_ahead(ids, ref, past_len)
            rows.append((ids, ref, past_len, None))
        todo = [(ids, ref, p) for ids, ref, p, hit in rows if hit is None]
        done = {}
        lone = len(requests) == 1 and requests[0][1]  # a lone request, not from a known text
        generating = all(may for _, may in requests)  # (no known text: see KVStore.chain_full)
        hints, self.hints = self.hints, ()
        if todo and generating and (hints or not lone) and len(requests) <= self.config.ahead_group:
            todo = self._with_guesses(todo, hints, done, lone)
        if lone and todo and (row := self.drafter.drafted(*todo[0])) is not None:
            done[todo[0][0]] = row
            todo = []
        for group in self.store.memory_groups(todo):
            for (ids, _, _), logp in zip(group, self.runner.forward(group, all_positions=False, grow=lone,
                                                                    short_chains=generating)):
                done[ids] = logp
        out = [hit if hit is not None else done[ids] for ids, _, _, hit in rows]
        if lone:
            # The caller goes on with this context, or (it ends with a short token, " ") with
            # the likeliest longer sibling computed with it (" the", see Drafter): guess both.
            ids = requests[0][0]
            self.ahead.start(ids, out[0], self.drafter.longer_sibling(ids))
        elif generating and 1 < len(requests) <= self.config.ahead_group:
            self.ahead.start_group([ids for ids, _ in requests], out)
        return out

    def _with_guesses(self, todo: list, hints: tuple, done: dict, lone: bool) -> list:
        """A few generation requests with what they will likely ask for next, in one ragged tree
        pass (:meth:`PassRunner.tree_rows`): up to ``hint_tokens`` hinted contexts one token past
        a cached past (the likeliest first; a hint whose past is a prefix of a request's context
        branches off that request's row, the others get rows of their own), and each request's
        prompt-lookup draft (:meth:`Drafter.draft_items`). A lone request drafts here only along
        with hints (the hints take the place of the Drafter's guessed siblings); a few requests
        asked together (a beam whose covers follow one text in different segmentations, or a
        few states stepping together) draft with or without hints (``group_drafts``). Returns
        what is left to run (``done`` takes the rows computed); ``todo`` itself when nothing is
        guessed or the pass would not fit one pass."""
        cache, want, d = self.cache, {ids for ids, _, _ in todo}, self.drafter
        picked = []
        for h in hints:
            if len(picked) >= self.config.hint_tokens:
                break
            if h in want or len(h) < 2 or cache.get_logp(h) is not None or h in picked:
                continue
            picked.append(h)
        rows = [(ids, ref, p, []) for ids, ref, p in todo]
        for h in picked:
            n = len(h) - 1
            row = next((r for r in rows[:len(todo)] if len(r[0]) >= n and r[0][:n] == h[:n]), None)
            if row is not None:
                row[3].append((n, (h[-1],), ()))
                continue
            P, ref = cache.deepest_kv(h, n)
            if P == n:  # (a hint whose past was evicted is not worth its tokens)
                rows.append((h, ref, P, []))
        hinted = len(rows) > len(todo) or any(r[3] for r in rows)
        group = not lone and self.config.group_drafts and self.store.kv_reuse
        if not (hinted or group) or len(self.store.memory_groups([r[:3] for r in rows])) > 1:
            return todo
        for ids, _, p, items in rows[:len(todo)] if lone or group else ():
            items += d.draft_items(ids, p)
        if not hinted and not any(r[3] for r in rows):
            return todo
        ids, ref, p, items = rows[0]
        if len(rows) == 1:  # one row: a tree pass, which writes a lone request's arena in place
            self.runner.tree_pass(ids, p, ref, len(ids) - p, items, grow=lone)
            if (row := self.cache.get_logp(ids, held=True)) is not None:
                done[ids] = row
            return [r for r in todo if r[0] not in done]
        for (ids, *_), row in zip(rows, self.runner.tree_rows(rows, hand_out=len(todo))):
            if row is not None:
                done[ids] = row
        return [r for r in todo if r[0] not in done]

    def run_ahead(self, ids: tuple, ref, p: int) -> tuple[int, object]:
        """A context far longer than its cached past ``p`` (e.g. one whose past was evicted) runs
        its new tokens in passes that fit ``pass_share`` of the budget, all but the last here:
        returns the past ``(length, ref)`` left for the batched pass."""
        if not self.store.kv_reuse:
            return p, ref
        return self.run_in_chunks(ids, p, ref, len(ids), all_positions=False)

    def run_in_chunks(self, ids: tuple, P: int, ref, reach: int, all_positions: bool,
                      most: int | None = None) -> tuple[int, object]:
        """Run ``ids[P:reach]`` on the past ``ref`` (``ids[:P]``) in passes of at most ``most``
        new tokens (default: all) that fit ``pass_share`` of the budget, all but the last:
        returns the deepest cached past ``(length, ref)`` left for the caller's own pass."""
        while reach - P > (step := self.store.pass_tokens(P, most or reach - P)):
            self.runner.forward([(ids[:P + step], ref, P)], all_positions=all_positions)
            nxt, nref = self.cache.deepest_kv(ids, P + step)
            if nxt <= P:  # evicted at once (a tiny budget): the rest in one pass
                break
            P, ref = nxt, nref
        return P, ref

    @torch.inference_mode()
    def prefetch(self, ids: tuple, items: list[tuple[int, tuple, tuple]], start: int = 0) -> None:
        """Distributions after every prefix of ``ids`` longer than ``start`` and along every item
        ``(i, chain, subs)`` (see AsyncTransformer.prefetch)."""
        self.check_model()
        if not self.store.kv_reuse:  # no pasts: every context runs whole
            self._prefetch_whole(ids, items, start)
            return
        n, cache, runner, cfg = len(ids), self.cache, self.runner, self.config
        done = self._cached_to(ids, start)
        first = True
        while first or items:
            P, ref = cache.deepest_kv(ids, done)
            reach = self._reach(n, done, P, items)
            # A long stretch runs in chunks first, each within pass_share of the budget; the
            # last one joins the tree pass.
            P, ref = self.run_in_chunks(ids, P, ref, reach, all_positions=True, most=cfg.prefetch_chunk)
            tail = reach - P
            room = max(16, self.store.pass_tokens(P, tail + cfg.alt_chunk) - tail)
            chunk, used = [], 0
            while items and (not chunk or used + len(items[0][1]) + len(items[0][2]) <= room):
                chunk.append(items.pop(0))
                used += len(chunk[-1][1]) + len(chunk[-1][2])
            if chunk:
                runner.tree_pass(ids, P, ref, tail, chunk)
            elif tail:  # a plain path: a causal pass (no tree mask) is faster
                runner.forward([(ids[:reach], ref, P)], all_positions=True)
            done, first = n, False
        logger.debug("prefetched %d tokens", n)

    def _cached_to(self, ids: tuple, start: int) -> int:
        """How far from ``start`` on the prefixes of ``ids`` have their log-probs and KV cached."""
        path = self.cache.walk(ids)
        done = min(start, len(path))
        while done < len(path) and path[done].logp is not None and path[done].kv is not None:
            done += 1
        return done

    @staticmethod
    def _reach(n: int, done: int, P: int, items) -> int:
        """How far a prefetch's path must run in its pass: to its end while its rows are missing,
        else as far as the alternatives branch off it (its past may have been evicted since)."""
        return n if done < n else max([P] + [i for i, _, _ in items])

    @torch.inference_mode()
    def prefetch_many(self, jobs: list[tuple[tuple, list, int]]) -> None:
        """:meth:`prefetch` of several ``(ids, items, start)`` jobs, in as few passes as fit: the
        short ones (each a path's uncached end and its items, within one pass alone, on a past
        not due to be stored whole) run together (:meth:`PassRunner.tree_many`: their pasts end
        to end in one row, no padding), up to ``alt_chunk`` slots and ``pass_share`` of the
        budget a pass; the rest, and a short one left alone, as :meth:`prefetch` runs them."""
        self.check_model()
        if len(jobs) < 2 or not self.store.kv_reuse or not self.config.prefetch_together:
            for job in jobs:
                self.prefetch(*job)
            return
        cap, most = self.config.pass_share * self.cache.budget_bytes, self.config.alt_chunk
        batches, cur, alone, past, slots = [], [], [], 0, 0
        for job in jobs:
            ids, items, start = job
            done = self._cached_to(ids, start)
            P, ref = self.cache.deepest_kv(ids, done)
            reach = self._reach(len(ids), done, P, items)
            n = reach - P + sum(len(chain) + len(subs) for _, chain, subs in items)
            if n > most or n > self.store.pass_tokens(P, n) or self.store.chain_full(ref):
                alone.append(job)
                continue
            if not n:  # (nothing left to compute)
                continue
            p, q = past + P, slots + n
            if cur and (q > most or self.store.pass_bytes(1, p + q, q, q) > cap):
                batches.append(cur)
                cur, p, q = [], P, n
            cur.append((job, (ids[:reach], P, ref, reach - P, list(items))))
            past, slots = p, q
        for batch in batches + [cur]:
            if len(batch) > 1:
                self.runner.tree_many([tree for _, tree in batch])
            else:
                alone[:0] = [job for job, _ in batch]
        for job in alone:
            self.prefetch(*job)

    def _prefetch_whole(self, ids: tuple, items, start: int) -> None:
        """:meth:`prefetch` without KV reuse: every context runs whole."""
        n, path = len(ids), self.cache.walk(ids)
        done = min(start, len(path))
        while done < len(path) and path[done].logp is not None:
            done += 1
        while done < n:
            end = min(n, done + self.config.prefetch_chunk)
            self.runner.forward([(ids[:end], None, 0)], all_positions=True)
            done = end
        for i, chain, subs in items:
            self.runner.forward([(ids[:i] + chain, None, 0)], all_positions=True)
            for k, t in subs:
                self.runner.forward([(ids[:i] + chain[:k] + (t,), None, 0)], all_positions=False)
