/**
 * `release-boot prune`: delete old boot-dev releases, stale drafts and orphaned boot-dev tags,
 * never a published boot-v* release. It only deletes what its plan names, and only while the
 * release, read again just before, still fits the plan.
 */
import { type Attachment, type Release, type Tag } from "../../types/forgejo.ts";
import { type Env, formatBytes, ReleaseError, type Run, UsageError } from "./run.ts";
import { type PruneOptions } from "./cli.ts";
import { checkForgejo, connectForgejo, type Forgejo, readToken, refuseMirror } from "./forgejo.ts";

export async function pruneReleases(run: Run, options: PruneOptions, env: Env): Promise<void> {
  const token = readToken(env, run);
  if (!token) {
    throw new UsageError(
      `prune deletes releases: set FORGEJO_TOKEN to a token that can write releases of ${options.site.repo} (in a workflow: FORGEJO_TOKEN: \${{ secrets.GITHUB_TOKEN }})`,
    );
  }
  const forgejo = connectForgejo(run, refuseMirror(options.site, options.mirrors), token, options);
  await run.step("Check Forgejo", () => checkForgejo(run, forgejo));
  // Tags first: a release published meanwhile then has its tag listed, never as an orphan.
  const plan = await run.step("Plan", async () => {
    const tags = await forgejo.tags.list();
    const releases = await forgejo.releases.list();
    return planPrune(releases, tags, new Date(), options.keep, options.staleDays);
  });
  for (const kept of plan.kept) run.log(`Keeping ${kept.tag}: ${kept.why}`);
  const done: PruneDeletion[] = [];
  for (const deletion of plan.deletions) {
    let deleted: PruneDeletion | undefined;
    try {
      deleted = options.dryRun
        ? deletion
        : await deleteForPrune(run, forgejo, deletion, options.staleDays);
    } catch (error) {
      if (!(error instanceof ReleaseError)) throw error;
      throw new ReleaseError(
        `${error.message} (prune stopped after ${done.length} of ${plan.deletions.length} deletions; the releases it did not reach are untouched: rerun to continue)`,
      );
    }
    if (!deleted) continue;
    done.push(deleted);
    run.result(renderPruneDeletion(deleted, options.dryRun));
  }
  run.result(renderPruneTotal(done, options.dryRun));
}

/**
 * The release (with its assets), then its tag; a tag a release holds again is kept. The
 * release is read again just before: one that changed since the listing so that the plan's
 * reason no longer holds is skipped with a line saying why (undefined: nothing deleted).
 */
async function deleteForPrune(
  run: Run,
  forgejo: Forgejo,
  deletion: PruneDeletion,
  staleDays: number,
): Promise<PruneDeletion | undefined> {
  if (deletion.releaseId !== undefined) {
    const now = await forgejo.releases.byId(deletion.releaseId);
    const why = now
      ? changeSinceListing(deletion, now, new Date(), staleDays)
      : "it was deleted since prune listed it";
    if (why) {
      run.log(
        `Skipped ${
          deletion.draft ? "draft" : "release"
        } ${deletion.tag}: ${why}; nothing of it was deleted`,
      );
      return undefined;
    }
    await forgejo.releases.remove(deletion.releaseId);
  }
  if (!deletion.deleteTag) return deletion;
  if (await forgejo.tags.remove(deletion.tag) !== "held") return deletion;
  run.log(`Kept the tag ${deletion.tag}: a release holds it again`);
  return { ...deletion, deleteTag: false };
}

/** Why a planned deletion no longer holds for the release as it is now; undefined if it does. */
function changeSinceListing(
  planned: PruneDeletion,
  release: PruneRelease,
  now: Date,
  staleDays: number,
): string | undefined {
  const tag = release.tag_name;
  if (planned.draft) {
    if (!release.draft) {
      return "it was published since prune listed it, so it is no longer a stale draft";
    }
    if (tag !== planned.tag) return `it is tagged ${tag} since prune listed it`;
    const changed = lastChange(release);
    if (changed === undefined || now.getTime() - changed < staleDays * DAY_MS) {
      return "it changed since prune listed it, so it is no longer a stale draft";
    }
    return undefined;
  }
  if (!tag.startsWith("boot-dev-")) {
    return `it is tagged ${tag} since prune listed it, no longer a boot-dev-* release`;
  }
  if (release.draft) return "it was made a draft since prune listed it";
  if (tag !== planned.tag) return `it is tagged ${tag} since prune listed it`;
  return undefined;
}

/** The parts of a release that prune judges. */
export type PruneRelease =
  & Pick<Release, "id" | "tag_name" | "draft" | "created_at" | "published_at">
  & { assets: Pick<Attachment, "size" | "created_at">[] };

/** One deletion: the release first (which deletes its assets), then its tag. */
interface PruneDeletion {
  tag: string;
  /** Absent for a tag whose release is already gone. */
  releaseId?: number;
  draft: boolean;
  /** Days since the release last changed; absent for a tag alone. */
  ageDays?: number;
  bytes: number;
  /** Delete the git tag after the release (Forgejo refuses, 409, while a release holds it). */
  deleteTag: boolean;
  why: string;
}

interface PrunePlan {
  /** Oldest first, so an interrupted run has removed the oldest. */
  deletions: PruneDeletion[];
  /** The boot-* releases left alone, and why. */
  kept: { tag: string; why: string }[];
}

const DAY_MS = 24 * 60 * 60 * 1000;

/**
 * When a release last changed: the newest of its creation, publication and uploads (a draft
 * being assembled gains assets; a published release's dates move to the publish time).
 * Undefined when Forgejo gave no readable date.
 */
function lastChange(release: PruneRelease): number | undefined {
  const times = [
    release.created_at,
    release.published_at,
    ...release.assets.map((asset) => asset.created_at),
  ]
    .map((text) => text === undefined ? NaN : Date.parse(text))
    .filter((time) => Number.isFinite(time));
  return times.length > 0 ? Math.max(...times) : undefined;
}

/**
 * Which releases and tags to delete:
 * - published `boot-dev-*` releases beyond the `keep` newest, with their tags;
 * - drafts of any `boot-*` tag that have not changed for `staleDays` days (what interrupted
 *   runs leave); a draft has no git tag until it is published, so only a `boot-dev-*` tag
 *   of that name is deleted with it;
 * - `boot-dev-*` tags whose release is gone (a run stopped between the two deletions).
 * Never a published `boot-v*` release or its tag, a younger draft (another job may be
 * assembling it), or a release without a readable date. `tags` undefined: tags unknown.
 */
export function planPrune(
  releases: PruneRelease[],
  tags: Pick<Tag, "name">[] | undefined,
  now: Date,
  keep: number,
  staleDays: number,
): PrunePlan {
  if (!Number.isInteger(keep) || keep < 0) {
    throw new UsageError(`keep ${keep} releases? give a whole number, 0 or more`);
  }
  if (!Number.isFinite(staleDays) || staleDays < 1) {
    throw new UsageError(
      `a draft is stale after ${staleDays} days? give 1 or more: a younger draft may be in progress`,
    );
  }
  const tagNames = tags && new Set(tags.map((tag) => tag.name));
  const hasTag = (name: string) => tagNames === undefined || tagNames.has(name);
  const ageOf = (time: number) => (now.getTime() - time) / DAY_MS;
  const deletions: PruneDeletion[] = [];
  const kept: PrunePlan["kept"] = [];
  const remove = (release: PruneRelease, age: number, deleteTag: boolean, why: string) =>
    deletions.push({
      tag: release.tag_name,
      releaseId: release.id,
      draft: release.draft,
      ageDays: age,
      bytes: release.assets.reduce((total, asset) => total + asset.size, 0),
      deleteTag,
      why,
    });

  const devReleases: { release: PruneRelease; changed: number }[] = [];
  for (const release of releases) {
    const tag = release.tag_name;
    if (!tag.startsWith("boot-")) continue;
    const changed = lastChange(release);
    if (changed === undefined) {
      kept.push({ tag, why: "Forgejo gave no date to judge its age by" });
    } else if (release.draft) {
      const age = ageOf(changed);
      if (age >= staleDays) {
        remove(
          release,
          age,
          tag.startsWith("boot-dev-") && tagNames !== undefined && tagNames.has(tag),
          `draft unchanged for ${Math.floor(age)} days (stale after ${staleDays})`,
        );
      } else {
        kept.push({ tag, why: `draft changed ${ageText(age)} ago: it may still be assembled` });
      }
    } else if (tag.startsWith("boot-dev-")) {
      devReleases.push({ release, changed });
    } else {
      kept.push({
        tag,
        why: tag.startsWith("boot-v") ? "a published boot-v* release" : "published, not boot-dev-*",
      });
    }
  }
  devReleases.sort((a, b) => b.changed - a.changed || b.release.id - a.release.id);
  devReleases.forEach(({ release, changed }, index) => {
    if (index < keep) {
      kept.push({ tag: release.tag_name, why: `one of the ${keep} newest boot-dev releases` });
    } else {
      remove(
        release,
        ageOf(changed),
        hasTag(release.tag_name),
        keep === 0
          ? "no boot-dev release is kept"
          : `older than the ${keep} newest boot-dev releases`,
      );
    }
  });

  deletions.sort((a, b) => (b.ageDays ?? 0) - (a.ageDays ?? 0));
  const released = new Set(releases.map((release) => release.tag_name.toLowerCase()));
  for (const name of tagNames ?? []) {
    if (name.startsWith("boot-dev-") && !released.has(name.toLowerCase())) {
      deletions.push({
        tag: name,
        draft: false,
        bytes: 0,
        deleteTag: true,
        why: "a tag left behind by a release deleted earlier",
      });
    }
  }
  return { deletions, kept };
}

function ageText(days: number): string {
  if (days < 1) return "under a day";
  const whole = Math.floor(days);
  return `${whole} day${whole === 1 ? "" : "s"}`;
}

/** The line printed for one deletion, once it is done (or, with --dry-run, planned). */
export function renderPruneDeletion(deletion: PruneDeletion, dryRun: boolean): string {
  const verb = dryRun ? "Would delete" : "Deleted";
  if (deletion.releaseId === undefined) {
    return `${verb} tag ${deletion.tag}: ${deletion.why}`;
  }
  const what = deletion.draft ? "draft" : "release";
  const age = deletion.ageDays === undefined ? "age unknown" : `${ageText(deletion.ageDays)} old`;
  const tag = deletion.deleteTag ? " and its tag" : "";
  return `${verb} ${what} ${deletion.tag}${tag} (${age}, ${
    formatBytes(deletion.bytes)
  }): ${deletion.why}`;
}

/** The closing line: how much the done (or planned) deletions free. */
export function renderPruneTotal(done: PruneDeletion[], dryRun: boolean): string {
  const bytes = done.reduce((total, deletion) => total + deletion.bytes, 0);
  const releases = done.filter((deletion) => deletion.releaseId !== undefined).length;
  const tagsOnly = done.length - releases;
  const counted = `${releases} release${releases === 1 ? "" : "s"}${
    tagsOnly > 0 ? ` and ${tagsOnly} tag${tagsOnly === 1 ? "" : "s"}` : ""
  }`;
  if (done.length === 0) return "Nothing to prune";
  return dryRun
    ? `Would free ${formatBytes(bytes)} from ${counted}; --dry-run deleted nothing`
    : `Freed ${formatBytes(bytes)} from ${counted}`;
}
