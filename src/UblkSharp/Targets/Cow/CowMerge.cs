using UblkSharp.Interop;

namespace UblkSharp.Targets.Cow;

/// <summary>What a merge did.</summary>
public sealed record CowMergeResult(string Output, bool InPlace, long Bytes, long CowSectors);

/// <summary>
/// Folds a COW overlay into a plain image, as uml_moo does: into a new file (every sector from
/// where its bit says; all-zero blocks are left as holes), or, with no new file, in place into the
/// backing file (only the sectors the COW file holds are written). An in-place merge that is
/// interrupted can be run again (the backing file's mtime then no longer matches the header, so
/// with <see cref="CowOpenOptions.IgnoreBackingMismatch"/>): it writes the same data again.
/// <para>
/// The new image is exactly the backing file's size; uml_moo drops a last partial sector, so
/// the two agree byte for byte whenever the size is a multiple of 512.
/// </para>
/// </summary>
public static class CowMerge
{
    private const int Chunk = 1 << 20;
    private const int ZeroCheck = 4096;

    /// <param name="overlayPath">The COW file.</param>
    /// <param name="intoPath">A new image to create, or null to merge into the backing file.</param>
    /// <param name="options">Backing file override and mismatch policy (ReadOnly is implied).</param>
    /// <param name="progress">Called with (bytes done, bytes in all) as the merge goes.</param>
    public static CowMergeResult Merge(string overlayPath, string? intoPath, CowOpenOptions? options = null, Action<long, long>? progress = null)
    {
        options ??= new CowOpenOptions();
        return intoPath is null ? MergeInPlace(overlayPath, options, progress) : MergeInto(overlayPath, intoPath, options, progress);
    }

    private static CowMergeResult MergeInto(string overlayPath, string intoPath, CowOpenOptions options, Action<long, long>? progress)
    {
        if (File.Exists(intoPath))
        {
            throw new IOException($"{intoPath} already exists: merge into a new file (or remove it first)");
        }
        using var target = new CowTarget(overlayPath, options with { ReadOnly = true, BitmapWriteback = TimeSpan.Zero });
        if (Path.GetFullPath(intoPath) == Path.GetFullPath(target.BackingPath))
        {
            throw new ArgumentException($"{intoPath} is the backing file: leave out --into to merge into it in place");
        }
        var size = target.Header.Size;
        using var output = FileCowStorage.Open(intoPath, writable: true, create: true);
        var ok = false;
        try
        {
            var buf = GC.AllocateUninitializedArray<byte>(Chunk);
            for (long pos = 0; pos < size; pos += Chunk)
            {
                var len = (int)Math.Min(Chunk, size - pos);
                var span = buf.AsSpan(0, len);
                Check(target.Read(span, pos), $"read {overlayPath} at {pos}");
                for (var b = 0; b < len; b += ZeroCheck)
                {
                    var block = span.Slice(b, Math.Min(ZeroCheck, len - b));
                    if (block.ContainsAnyExcept((byte)0))
                    {
                        Check(output.Write(block, pos + b), $"write {intoPath}");
                    }
                }
                progress?.Invoke(pos + len, size);
            }
            output.Truncate(size);
            Check(output.Sync(), $"fdatasync {intoPath}");
            ok = true;
            return new CowMergeResult(Path.GetFullPath(intoPath), false, size, target.CowSectors);
        }
        finally
        {
            if (!ok)
            {
                output.Dispose();
                File.Delete(intoPath);
            }
        }
    }

    private static CowMergeResult MergeInPlace(string overlayPath, CowOpenOptions options, Action<long, long>? progress)
    {
        using var target = CowTarget.OpenForInPlaceMerge(overlayPath, options);
        var size = target.Header.Size;
        var shift = System.Numerics.BitOperations.Log2((uint)target.Header.SectorSize);
        var sectors = target.Bitmap.Sectors;
        var buf = GC.AllocateUninitializedArray<byte>(Chunk);
        long written = 0;
        long s = 0;
        while (s < sectors)
        {
            var runEnd = target.Bitmap.RunEnd(s, sectors, out var inCow);
            if (inCow)
            {
                // The last sector may be partial: the backing file keeps its size.
                var end = Math.Min(runEnd << shift, size);
                for (var pos = s << shift; pos < end; pos += Chunk)
                {
                    var span = buf.AsSpan(0, (int)Math.Min(Chunk, end - pos));
                    Check(target.CowFile.ReadFull(span, target.DataOffset + pos), $"read {overlayPath}");
                    Check(target.BackingFile.Write(span, pos), $"write {target.BackingPath}");
                    written += span.Length;
                    progress?.Invoke(pos + span.Length, size);
                }
            }
            s = runEnd;
            progress?.Invoke(Math.Min(s << shift, size), size);
        }
        Check(target.BackingFile.Sync(), $"fdatasync {target.BackingPath}");
        return new CowMergeResult(target.BackingPath, true, written, target.CowSectors);
    }

    private static void Check(int r, string what)
    {
        if (r < 0)
        {
            throw new ErrnoException(-r, what);
        }
    }
}
