/**
 * Work on several items at once, a bounded number at a time, with one failure model: the
 * first failure stops new work, tells the work under way through its signal, and is thrown
 * only once everything started has settled. It knows nothing of what the work is.
 */

/**
 * Runs `work` on every item, at most `lanes` at once, in order of the list. After the first
 * failure no item starts, `signal` is aborted (work that can stop early does; work that
 * must finish ignores it), and once every started item has settled that first failure is
 * thrown: nothing is still running when the caller hears of it.
 */
export async function inLanes<T>(
  items: T[],
  lanes: number,
  work: (item: T, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const stop = new AbortController();
  const failures: unknown[] = [];
  let next = 0;
  const lane = async () => {
    while (failures.length === 0 && next < items.length) {
      const item = items[next++];
      try {
        await work(item, stop.signal);
      } catch (error) {
        failures.push(error);
        stop.abort();
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(lanes, items.length)) }, lane));
  if (failures.length > 0) throw failures[0];
}
