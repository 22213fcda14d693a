using System.Globalization;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Targets.Cow;

/// <summary>
/// A User-Mode Linux ubd COW overlay as a disk: a read-only backing file plus a COW file that
/// holds a header naming the backing file, a bitmap of the sectors that live in the COW file, and
/// then those sectors. Files made by UML (<c>ubd0=COW,BASE</c>) and uml_mkcow open here, and
/// the files this target writes open in UML and merge with uml_moo.
/// <para>
/// Reads take each run of sectors from where its bits say, so one request can be split between
/// the two files; it still completes once, whole. Writes go to the COW file's data area; the
/// sectors' bits are set in memory only after the data is written, and reach the file later
/// (on flush, on close and every <see cref="CowOpenOptions.BitmapWriteback"/>) in this order:
/// </para>
/// <list type="number">
/// <item>copy the dirty bitmap pages (only bits whose data was already written can be in the copy);</item>
/// <item>fdatasync the COW file: all that data is now durable;</item>
/// <item>write the copied pages; on flush, fdatasync again.</item>
/// </list>
/// <para>
/// So whatever a crash (of this process or of the machine) leaves behind, a bit that is set on
/// disk has its sector's data on disk: every sector reads either its old data (the backing file,
/// or an earlier write) or data that was written to it, never unwritten space. Writes that were
/// not flushed may read old after a crash, as on any disk with a volatile cache, which this
/// device advertises. Discard and write-zeroes punch (or zero) the range in the data area and
/// set its bits, so it reads as zeros.
/// </para>
/// </summary>
public sealed unsafe class CowTarget : BlockTarget
{
    private const int PersistBatchPages = 256;
    private readonly CowStorage _cow;
    private readonly CowStorage _backing;
    private readonly CowBitmap _bitmap;
    private readonly int _sectorShift;
    private readonly long _dataOffset;
    private readonly bool _readOnly;
    // One persister at a time (a queue's ring, the writeback thread, a synchronous flush): two
    // writing one bitmap page at once could land an older copy over a newer one.
    private int _persisting;
    private readonly Dictionary<string, string> _recipe;
    private readonly Thread? _writeback;
    private readonly ManualResetEventSlim _stop = new();
    private byte* _scratch;
    private int[]? _pageList;
    private readonly bool _ring;
    private readonly CowAllocationMap? _allocation;

    // Write-like operations completed (data written and bits set in memory), and how many of the
    // first of them are known durable: a flush that finds its count already durable returns at once.
    private long _completed;
    private long _durable;
    private int _disposed;

    /// <summary>Opens an existing COW file; its header names the backing file and its size.</summary>
    /// <exception cref="CowFormatException">Not a usable COW file.</exception>
    /// <exception cref="CowBackingMismatchException">The backing file changed since the overlay was made.</exception>
    /// <exception cref="IOException">A file cannot be opened, or is in use.</exception>
    public CowTarget(string overlayPath, CowOpenOptions? options = null)
        : this(Open(overlayPath, options ?? new CowOpenOptions(), backingWritable: false), options ?? new CowOpenOptions())
    {
    }

    internal CowTarget(CowStorage cow, CowStorage backing, CowHeader header, string overlayPath, string backingPath, CowOpenOptions options)
        : this((cow, backing, header, overlayPath, backingPath), options)
    {
    }

    private CowTarget((CowStorage Cow, CowStorage Backing, CowHeader Header, string OverlayPath, string BackingPath) o, CowOpenOptions options)
    {
        _cow = o.Cow;
        _backing = o.Backing;
        Header = o.Header;
        OverlayPath = o.OverlayPath;
        BackingPath = o.BackingPath;
        _readOnly = options.ReadOnly;
        try
        {
            if (Header.SectorSize > 4096)
            {
                throw new CowFormatException($"{OverlayPath}: COW sector size {Header.SectorSize} is not supported (at most 4096, the largest block size a ublk device has)");
            }
            _sectorShift = System.Numerics.BitOperations.Log2((uint)Header.SectorSize);
            _dataOffset = Header.DataOffset;
            _bitmap = new CowBitmap(Header.BitmapLength, Header.BitmapSectors);
            var r = _cow.ReadFull(_bitmap.Bytes[..(int)Math.Min(Header.BitmapLength, int.MaxValue)], Header.BitmapOffset);
            if (r < 0)
            {
                throw new ErrnoException(-r, $"read the COW bitmap of {OverlayPath}");
            }
            ClearBitsPastEnd();
            _bitmap.MarkAllPersisted();
            Size = _bitmap.Sectors << _sectorShift;
            _ring = _cow.Fd >= 0 && _backing.Fd >= 0 && options.Io switch
            {
                LoopIo.Ring => true,
                LoopIo.Sync => false,
                _ => !LoopTarget.IsMemoryFileSystem(_cow.Fd) && !LoopTarget.IsMemoryFileSystem(_backing.Fd),
            };
            if (!_readOnly && options.AllocationChunk > 0)
            {
                _allocation = new CowAllocationMap(Size, options.AllocationChunk);
            }
            _recipe = new Dictionary<string, string> { ["file"] = OverlayPath };
            if (options.BackingFile is not null)
            {
                _recipe["backing"] = BackingPath;
            }
            if (options.IgnoreBackingMismatch)
            {
                _recipe["ignore-backing-mismatch"] = "on";
            }
            if (_readOnly)
            {
                _recipe["read-only"] = "on";
            }
            if (options.BitmapWriteback != CowOpenOptions.DefaultBitmapWriteback)
            {
                _recipe["writeback"] = options.BitmapWriteback.TotalSeconds.ToString(CultureInfo.InvariantCulture);
            }
            if (options.AllocationChunk != CowOpenOptions.DefaultAllocationChunk)
            {
                _recipe["allocate"] = options.AllocationChunk.ToString(CultureInfo.InvariantCulture);
            }
            if (options.Io != LoopIo.Auto)
            {
                _recipe["io"] = options.Io == LoopIo.Ring ? "ring" : "sync";
            }
            if (!_readOnly && options.BitmapWriteback > TimeSpan.Zero)
            {
                var interval = options.BitmapWriteback;
                _writeback = new Thread(() => WritebackLoop(interval)) { IsBackground = true, Name = "cow bitmap" };
                _writeback.Start();
            }
        }
        catch
        {
            _cow.Dispose();
            _backing.Dispose();
            throw;
        }
    }

    public CowHeader Header { get; }

    public string OverlayPath { get; }

    /// <summary>The backing file in use (the header's, unless overridden).</summary>
    public string BackingPath { get; }

    public override long Size { get; }

    public override string Kind => "cow";

    public override IReadOnlyDictionary<string, string> Recipe => _recipe;

    public override int LogicalBlockSize => Header.SectorSize;

    public override int PhysicalBlockSize => Math.Max(4096, Header.SectorSize);

    public override bool IsReadOnly => _readOnly;

    // Bits set since the last bitmap write live in memory only (up to --writeback seconds of them):
    // a crash loses them, while Dispose writes them out first. A read-only overlay sets none.
    public override bool SurvivesRestart => _readOnly;

    public override bool SurvivesHandOver => true;

    /// <summary>Why a writable overlay cannot be recovered after a crash (for callers without a target yet).</summary>
    public const string WritableRecoveryRefusal = "a writable cow target loses its latest state in a crash (the bitmap bits since the last write-back)";

    public override string RecoveryRefusal => WritableRecoveryRefusal;

    public override bool HasVolatileCache => !_readOnly;

    public override bool CanDiscard => !_readOnly;

    public override bool CanWriteZeroes => !_readOnly;

    /// <summary>Sectors whose data is in the COW file.</summary>
    public long CowSectors => _bitmap.CountSet();

    internal CowBitmap Bitmap => _bitmap;

    internal CowStorage CowFile => _cow;

    internal CowStorage BackingFile => _backing;

    internal long DataOffset => _dataOffset;

    internal int SectorShift => _sectorShift;

    /// <summary>The data area's chunks allocated ahead of their first write; null when off (or read-only).</summary>
    internal CowAllocationMap? Allocation => _allocation;

    /// <summary>
    /// A fallocate the map asked for has ended with <paramref name="res"/>: on success its chunks
    /// are allocated; a file system without fallocate turns the map off. Any other error is left to
    /// the write that follows, which says for itself whether its data fits.
    /// </summary>
    internal void Allocated(long start, long count, int res)
    {
        if (res == 0)
        {
            _allocation?.MarkAllocated(start, count);
        }
        else if (res is -Errno.EOPNOTSUPP or -Errno.ENODEV or -Errno.EINVAL)
        {
            _allocation?.Disable();
        }
    }

    /// <summary>Whether ublk queues do this overlay's IO on their io_uring (else synchronously on the queue thread).</summary>
    public bool UsesRing => _ring;

    /// <summary>
    /// Each queue's ring runs reads (a step per run of sectors, from whichever file its bits say),
    /// writes (the bits set once the data is written), discards and flushes (the same persist
    /// order as <see cref="Flush"/>) with many requests in flight; see <see cref="CowUringBackend"/>.
    /// </summary>
    public override UringBackend? CreateUringBackend(int queueId) => _ring ? new CowUringBackend(this, _cow.Fd, _backing.Fd) : null;

    /// <summary>On the ring, reads and writes move the request's pages without looking at them: zero copy where the kernel has it.</summary>
    public override bool SupportsZeroCopy => _ring;

    /// <summary>Whether sector <paramref name="sector"/> (of <see cref="CowHeader.SectorSize"/> bytes) is in the COW file.</summary>
    public bool IsInCow(long sector) => _bitmap.Test(sector);

    /// <summary>
    /// Makes a new COW file over <paramref name="backingPath"/>, as uml_mkcow does (version 3,
    /// the backing file's absolute path, mtime and size, 512-byte sectors, 4096-byte alignment;
    /// sparse up to the end of its data area). Refuses to overwrite an existing file.
    /// </summary>
    public static CowHeader CreateOverlay(string overlayPath, string backingPath, int sectorSize = 512, int alignment = 4096)
    {
        CheckCreate(overlayPath, backingPath);
        var abs = FileCowStorage.Absolutize(backingPath);
        long size;
        using (var b = FileCowStorage.Open(abs, writable: false))
        {
            size = b.Length;
        }
        if (size == 0)
        {
            throw new ArgumentException($"{backingPath} is empty: a COW overlay needs a backing file with data");
        }
        var header = CowHeader.Create(abs, FileCowStorage.ModificationTime(abs), size, sectorSize, alignment);
        using var cow = FileCowStorage.Open(overlayPath, writable: true, create: true);
        var bytes = header.ToBytes();
        Check(cow.Write(bytes, 0), $"write the COW header of {overlayPath}");
        // As init_cow_file(): one zero byte at the end of the data area sets the length, and the
        // bitmap in between reads as zeros without being written.
        Check(cow.Write(new byte[1], header.DataOffset + size - 1), $"extend {overlayPath}");
        Check(cow.Sync(), $"fdatasync {overlayPath}");
        return header;
    }

    /// <summary>The checks <see cref="CreateOverlay"/> makes before it touches anything: the backing file exists, the COW file does not.</summary>
    public static void CheckCreate(string overlayPath, string backingPath)
    {
        ArgumentNullException.ThrowIfNull(overlayPath);
        ArgumentNullException.ThrowIfNull(backingPath);
        if (!File.Exists(backingPath))
        {
            throw new FileNotFoundException($"{backingPath}: no such backing file", backingPath);
        }
        if (File.Exists(overlayPath))
        {
            throw new IOException($"{overlayPath} already exists: remove it first, or open it without --create");
        }
    }

    /// <summary>Reads the header of a COW file.</summary>
    public static CowHeader ReadHeader(string overlayPath)
    {
        using var cow = FileCowStorage.Open(overlayPath, writable: false);
        return ReadHeader(cow, overlayPath);
    }

    private static CowHeader ReadHeader(CowStorage cow, string name)
    {
        var buf = new byte[CowHeader.MaxSize];
        var n = 0;
        while (n < buf.Length)
        {
            var r = cow.Read(buf.AsSpan(n), n);
            if (r < 0)
            {
                throw new ErrnoException(-r, $"read {name}");
            }
            if (r == 0)
            {
                break;
            }
            n += r;
        }
        return CowHeader.Parse(buf.AsSpan(0, n), name);
    }

    /// <summary>Opens for a merge into the backing file: the COW file read-only, the backing file writable.</summary>
    internal static CowTarget OpenForInPlaceMerge(string overlayPath, CowOpenOptions options)
        => new(Open(overlayPath, options with { ReadOnly = true }, backingWritable: true), options with { ReadOnly = true });

    private static (CowStorage, CowStorage, CowHeader, string, string) Open(string overlayPath, CowOpenOptions options, bool backingWritable)
    {
        ArgumentNullException.ThrowIfNull(overlayPath);
        var overlay = Path.GetFullPath(overlayPath);
        if (!File.Exists(overlay) && !overlay.StartsWith("/dev/", StringComparison.Ordinal))
        {
            throw new FileNotFoundException($"{overlayPath}: no such COW file (make one with --create --backing BASE)", overlayPath);
        }
        var cow = FileCowStorage.Open(overlay, writable: !options.ReadOnly);
        FileCowStorage? backing = null;
        try
        {
            var header = ReadHeader(cow, overlayPath);
            var backingPath = options.BackingFile ?? header.BackingFile;
            if (!Path.IsPathRooted(backingPath))
            {
                backingPath = Path.Combine(Path.GetDirectoryName(overlay)!, backingPath);
            }
            if (!File.Exists(backingPath))
            {
                throw new FileNotFoundException(
                    $"{overlayPath}: its backing file {backingPath} does not exist{(options.BackingFile is null ? " (give the right one with --backing)" : "")}", backingPath);
            }
            backing = FileCowStorage.Open(backingPath, writable: backingWritable);
            if (!options.IgnoreBackingMismatch)
            {
                CheckBacking(overlayPath, backingPath, header, backing.Length, FileCowStorage.ModificationTime(backingPath));
            }
            return (cow, backing, header, overlay, backingPath);
        }
        catch
        {
            backing?.Dispose();
            cow.Dispose();
            throw;
        }
    }

    /// <summary>UML's backing_file_mismatch(): the size, then the mtime, must be what the header recorded.</summary>
    internal static void CheckBacking(string overlay, string backing, CowHeader header, long actualSize, long actualMTime)
    {
        const string hint = "UML refuses such an overlay too; if the backing file's data did not change, --ignore-backing-mismatch opens it anyway";
        if (actualSize != header.Size)
        {
            throw new CowBackingMismatchException(
                $"{overlay}: the backing file {backing} is {actualSize} bytes, but the COW header says {header.Size}: it changed since the overlay was made. {hint}");
        }
        if (actualMTime != header.MTime)
        {
            throw new CowBackingMismatchException(
                $"{overlay}: the backing file {backing} was modified at {Time(actualMTime)}, but the COW header says {Time(header.MTime)}: it changed since the overlay was made. {hint}");
        }
    }

    private static string Time(long t) => string.Create(CultureInfo.InvariantCulture, $"{DateTimeOffset.FromUnixTimeSeconds(t):yyyy-MM-dd HH:mm:ss} UTC ({t})");

    public override int Read(Span<byte> buffer, long offset)
    {
        if (offset < 0 || offset + buffer.Length > Size)
        {
            return -Errno.EINVAL;
        }
        var first = offset >> _sectorShift;
        var end = (offset + buffer.Length + Header.SectorSize - 1) >> _sectorShift;
        var done = 0;
        var s = first;
        while (s < end)
        {
            var runEnd = _bitmap.RunEnd(s, end, out var inCow);
            var runBytes = (int)(Math.Min((runEnd << _sectorShift) - offset, buffer.Length) - done);
            var pos = offset + done;
            var r = inCow
                ? _cow.ReadFull(buffer.Slice(done, runBytes), _dataOffset + pos)
                : _backing.ReadFull(buffer.Slice(done, runBytes), pos);
            if (r < 0)
            {
                return r;
            }
            done += runBytes;
            s = runEnd;
        }
        return buffer.Length;
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        var check = CheckWrite(offset, data.Length);
        if (check != 0)
        {
            return check;
        }
        if (_allocation is { } map && map.NeedsAllocation(offset, data.Length, out var start, out var count))
        {
            Allocated(start, count, _cow.Allocate(_dataOffset + start, count));
        }
        // Data first; the bits only once it is written (see the class comment for the crash argument).
        var r = _cow.Write(data, _dataOffset + offset);
        if (r < 0)
        {
            return r;
        }
        Completed(offset, data.Length);
        return data.Length;
    }

    public override int Discard(long offset, long length) => WriteZeroes(offset, length, mayUnmap: true);

    public override int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        var check = CheckWrite(offset, length);
        if (check != 0)
        {
            return check;
        }
        _allocation?.Forget(offset, length);
        var r = _cow.Fallocate(mayUnmap ? FallocateMode.PunchHole : FallocateMode.ZeroRange, _dataOffset + offset, length);
        if (r == -Errno.EOPNOTSUPP && !mayUnmap)
        {
            r = _cow.Fallocate(FallocateMode.PunchHole, _dataOffset + offset, length);
        }
        if (r == -Errno.EOPNOTSUPP || r == -Errno.ENODEV)
        {
            // No fallocate here: writes of zeros, which set the bits through Write.
            return base.WriteZeroes(offset, length, mayUnmap);
        }
        if (r < 0)
        {
            return r;
        }
        Completed(offset, length);
        return 0;
    }

    private int CheckWrite(long offset, long length)
    {
        if (_readOnly)
        {
            return -Errno.EROFS;
        }
        if (offset < 0 || length < 0 || offset + length > Size)
        {
            return -Errno.EINVAL;
        }
        // A partial sector whose bit is clear would need the rest of it from the backing file.
        var mask = Header.SectorSize - 1;
        return ((offset | length) & mask) != 0 ? -Errno.EINVAL : 0;
    }

    /// <summary>A write-like operation's data is written: sets its bits (in memory) and counts it; returns the count.</summary>
    internal long Completed(long offset, long length)
    {
        _bitmap.SetRange(offset >> _sectorShift, length >> _sectorShift);
        return Interlocked.Increment(ref _completed);
    }

    /// <summary>Write-like operations completed so far (a flush covers these).</summary>
    internal long CompletedCount => Volatile.Read(ref _completed);

    internal bool IsDurable(long count) => Volatile.Read(ref _durable) >= count;

    /// <summary>The first <paramref name="count"/> completed operations are durable (never moves back).</summary>
    internal void MarkDurable(long count)
    {
        var d = Volatile.Read(ref _durable);
        while (d < count)
        {
            var seen = Interlocked.CompareExchange(ref _durable, count, d);
            if (seen == d)
            {
                return;
            }
            d = seen;
        }
    }

    /// <summary>Takes the persist token without waiting; whoever holds it alone may take, copy and write bitmap pages.</summary>
    internal bool TryBeginPersist() => Interlocked.CompareExchange(ref _persisting, 1, 0) == 0;

    internal void EndPersist() => Volatile.Write(ref _persisting, 0);

    private void BeginPersist()
    {
        // Held for a few syncs and writes at most: wait as a lock would, off the queue threads.
        var spin = default(SpinWait);
        while (!TryBeginPersist())
        {
            spin.SpinOnce();
        }
    }

    /// <summary>Room for <see cref="PersistBatch"/> bitmap pages, and the page list; only the persist token's holder uses them.</summary>
    internal byte* PersistScratch => _scratch != null ? _scratch : _scratch = (byte*)NativeMemory.AlignedAlloc(PersistBatchPages * CowBitmap.PageBytes, 4096);

    internal int[] PersistPages => _pageList ??= new int[PersistBatchPages];

    internal const int PersistBatch = PersistBatchPages;

    /// <summary>Makes every write that completed before the call durable, data and bitmap.</summary>
    public override int Flush()
    {
        if (_readOnly)
        {
            return 0;
        }
        var target = Volatile.Read(ref _completed);
        if (IsDurable(target))
        {
            return 0;
        }
        BeginPersist();
        try
        {
            if (IsDurable(target))
            {
                return 0;
            }
            var covered = Volatile.Read(ref _completed);
            var r = PersistBitmapLocked();
            if (r < 0)
            {
                return r;
            }
            r = _cow.Sync();
            if (r < 0)
            {
                return r;
            }
            MarkDurable(covered);
            return 0;
        }
        finally
        {
            EndPersist();
        }
    }

    /// <summary>
    /// Writes the dirty bitmap pages: copy, fdatasync (the copied bits' data is durable), write.
    /// Not followed by a sync: a crash may lose these bits, never order them before their data.
    /// </summary>
    private int PersistBitmapLocked()
    {
        var scratch = new Span<byte>(PersistScratch, PersistBatchPages * CowBitmap.PageBytes);
        var pageList = PersistPages;
        // One pass over the dirty set, in batches: it takes every page dirtied before it began.
        var cursor = 0;
        while (cursor < _bitmap.DirtyWords)
        {
            var n = _bitmap.TakeDirty(pageList, ref cursor);
            if (n == 0)
            {
                continue;
            }
            for (var i = 0; i < n; i++)
            {
                _bitmap.CopyPage(pageList[i], scratch.Slice(i * CowBitmap.PageBytes, CowBitmap.PageBytes));
            }
            var r = _cow.Sync();
            for (var i = 0; i < n && r >= 0; i++)
            {
                var page = pageList[i];
                var snapshot = scratch.Slice(i * CowBitmap.PageBytes, CowBitmap.PageBytes);
                r = _cow.Write(snapshot[.._bitmap.PageLength(page)], Header.BitmapOffset + ((long)page * CowBitmap.PageBytes));
                if (r >= 0)
                {
                    _bitmap.MarkPersisted(page, snapshot);
                }
            }
            if (r < 0)
            {
                for (var i = 0; i < n; i++)
                {
                    _bitmap.MarkDirty(pageList[i]);
                }
                return r;
            }
        }
        return 0;
    }

    private void WritebackLoop(TimeSpan interval)
    {
        while (!_stop.Wait(interval))
        {
            if (_bitmap.AnyDirty())
            {
                // An error leaves the pages dirty; the next flush reports it.
                _ = WriteBackBitmap();
            }
        }
    }

    /// <summary>One round of the periodic bitmap writeback (no final sync).</summary>
    internal int WriteBackBitmap()
    {
        // A persist under way (a queue's flush) writes these pages anyway: skip the round.
        if (!TryBeginPersist())
        {
            return 0;
        }
        try
        {
            return PersistBitmapLocked();
        }
        finally
        {
            EndPersist();
        }
    }

    /// <summary>Bits past the last sector may be set in a file another program wrote; they mean nothing.</summary>
    private void ClearBitsPastEnd()
    {
        var bytes = _bitmap.Bytes;
        var sectors = _bitmap.Sectors;
        var firstByte = (int)(sectors / 8);
        if (firstByte < bytes.Length && sectors % 8 != 0)
        {
            bytes[firstByte] &= (byte)((1 << (int)(sectors % 8)) - 1);
            firstByte++;
        }
        if (firstByte < bytes.Length)
        {
            bytes[firstByte..].Clear();
        }
    }

    private static void Check(int r, string what)
    {
        if (r < 0)
        {
            throw new ErrnoException(-r, what);
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _stop.Set();
        _writeback?.Join();
        try
        {
            if (!_readOnly)
            {
                Check(Flush(), $"flush {OverlayPath}");
            }
        }
        finally
        {
            _cow.Dispose();
            _backing.Dispose();
            _stop.Dispose();
            if (_scratch != null)
            {
                NativeMemory.AlignedFree(_scratch);
                _scratch = null;
            }
            base.Dispose(disposing);
        }
    }
}
