using System.Numerics;
using System.Runtime.InteropServices;

namespace UblkSharp.Targets.Cow;

/// <summary>
/// The in-memory COW bitmap: one bit per sector, bit <c>s % 8</c> of byte <c>s / 8</c> as on disk,
/// held in 64-bit words (little-endian, so the bytes are the file's bytes) so that bits are set
/// with one <see cref="Interlocked.Or(ref ulong, ulong)"/> per word: writers on different queue
/// threads that touch the same word never lose each other's bits. Bits are only ever set.
/// <para>
/// It also tracks which pages of the bitmap (<see cref="PageBytes"/> each) hold bits not yet
/// written to the file: a writer sets its bits first and marks the page dirty second; the
/// persister takes a page's dirty mark first and copies the page second, so a bit set during
/// a copy is either in the copy or leaves the page dirty for the next round.
/// </para>
/// <para>
/// A writer whose bits are already set (another write to the same sectors got there first, and
/// may not have marked the page yet) still marks the page unless the bits are known to be in the
/// file: otherwise a flush that follows its completion could miss them.
/// </para>
/// </summary>
internal sealed class CowBitmap
{
    /// <summary>Bitmap bytes per dirty-tracking page: 32768 sectors.</summary>
    public const int PageBytes = 4096;

    private const int WordsPerPage = PageBytes / 8;
    private readonly ulong[] _words;
    private readonly ulong[] _persisted;
    private readonly ulong[] _dirty;

    public CowBitmap(long lengthBytes, long sectors)
    {
        if (lengthBytes > (long)int.MaxValue * 8)
        {
            throw new CowFormatException($"a COW bitmap of {lengthBytes} bytes is too large");
        }
        LengthBytes = lengthBytes;
        Sectors = sectors;
        _words = new ulong[(lengthBytes + 7) / 8];
        _persisted = new ulong[_words.Length];
        Pages = (int)((lengthBytes + PageBytes - 1) / PageBytes);
        _dirty = new ulong[(Pages + 63) / 64];
    }

    /// <summary>Bytes of the bitmap in the file.</summary>
    public long LengthBytes { get; }

    /// <summary>Sectors that have a bit.</summary>
    public long Sectors { get; }

    public int Pages { get; }

    /// <summary>The bitmap as the file's bytes (covers whole words: a few bytes past <see cref="LengthBytes"/>).</summary>
    public Span<byte> Bytes => MemoryMarshal.AsBytes(_words.AsSpan());

    public bool Test(long sector) => (Volatile.Read(ref _words[sector >> 6]) & (1UL << (int)(sector & 63))) != 0;

    /// <summary>The end of the run of sectors from <paramref name="sector"/> (exclusive, at most <paramref name="end"/>) that all have the same bit.</summary>
    public long RunEnd(long sector, long end, out bool set)
    {
        set = Test(sector);
        var s = sector + 1;
        while (s < end)
        {
            var word = Volatile.Read(ref _words[s >> 6]);
            if (!set)
            {
                word = ~word;
            }
            // Bits at and above s in this word that differ from the run's state.
            var differ = ~word & (ulong.MaxValue << (int)(s & 63));
            if (differ != 0)
            {
                return Math.Min(end, (s & ~63L) + BitOperations.TrailingZeroCount(differ));
            }
            s = (s & ~63L) + 64;
        }
        return end;
    }

    /// <summary>Sets the bits of sectors [first, first + count); returns whether any was newly set (and marks its page dirty).</summary>
    public bool SetRange(long first, long count)
    {
        var any = false;
        var s = first;
        var end = first + count;
        while (s < end)
        {
            var bit = (int)(s & 63);
            var n = (int)Math.Min(64 - bit, end - s);
            var mask = (n == 64 ? ulong.MaxValue : ((1UL << n) - 1)) << bit;
            ref var word = ref _words[s >> 6];
            var page = (int)((s >> 6) / WordsPerPage);
            if ((Volatile.Read(ref word) & mask) != mask && (Interlocked.Or(ref word, mask) & mask) != mask)
            {
                any = true;
                MarkDirty(page);
            }
            else if ((Volatile.Read(ref _persisted[s >> 6]) & mask) != mask)
            {
                MarkDirty(page);
            }
            s += n;
        }
        return any;
    }

    /// <summary>Records that the file now holds the bits of <paramref name="snapshot"/> (page <paramref name="page"/>, as copied by <see cref="CopyPage"/>). Persister only.</summary>
    public void MarkPersisted(int page, ReadOnlySpan<byte> snapshot)
    {
        var words = _persisted.AsSpan(page * WordsPerPage, Math.Min(WordsPerPage, _persisted.Length - (page * WordsPerPage)));
        for (var i = 0; i < words.Length; i++)
        {
            Volatile.Write(ref words[i], words[i] | MemoryMarshal.Read<ulong>(snapshot[(i * 8)..]));
        }
    }

    /// <summary>Records that every bit set now came from the file (after loading it).</summary>
    public void MarkAllPersisted() => _words.CopyTo(_persisted.AsSpan());

    public int CountSet()
    {
        var n = 0;
        foreach (var w in _words)
        {
            n += BitOperations.PopCount(w);
        }
        return n;
    }

    public void MarkDirty(int page)
    {
        var bit = 1UL << (page & 63);
        ref var w = ref _dirty[page >> 6];
        if ((Volatile.Read(ref w) & bit) == 0)
        {
            Interlocked.Or(ref w, bit);
        }
    }

    public bool AnyDirty()
    {
        for (var i = 0; i < _dirty.Length; i++)
        {
            if (Volatile.Read(ref _dirty[i]) != 0)
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>
    /// Takes dirty pages (clearing their marks) into <paramref name="pages"/>, scanning on from
    /// <paramref name="cursor"/> (a position in the dirty set; start at 0) and stopping before
    /// <paramref name="pages"/> would overflow. Calls until <paramref name="cursor"/> reaches
    /// <see cref="DirtyWords"/> take every page that was dirty before the first call.
    /// </summary>
    public int TakeDirty(Span<int> pages, ref int cursor)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(pages.Length, 64);
        var n = 0;
        for (; cursor < _dirty.Length; cursor++)
        {
            if (Volatile.Read(ref _dirty[cursor]) == 0)
            {
                continue;
            }
            // A word is taken whole and can hold 64 pages: take it only while that many fit.
            if (n + 64 > pages.Length)
            {
                break;
            }
            var taken = Interlocked.Exchange(ref _dirty[cursor], 0);
            while (taken != 0)
            {
                var b = BitOperations.TrailingZeroCount(taken);
                taken &= taken - 1;
                pages[n++] = (cursor << 6) + b;
            }
        }
        return n;
    }

    /// <summary>Words in the dirty set (the end of a <see cref="TakeDirty"/> scan).</summary>
    public int DirtyWords => _dirty.Length;

    /// <summary>Bytes of page <paramref name="page"/> in the file (the last page may be short).</summary>
    public int PageLength(int page) => (int)Math.Min(PageBytes, LengthBytes - ((long)page * PageBytes));

    /// <summary>Copies page <paramref name="page"/>'s file bytes into <paramref name="into"/>; returns their count.</summary>
    public int CopyPage(int page, Span<byte> into)
    {
        var len = PageLength(page);
        var words = _words.AsSpan(page * WordsPerPage, Math.Min(WordsPerPage, _words.Length - (page * WordsPerPage)));
        for (var i = 0; i < words.Length; i++)
        {
            var w = Volatile.Read(ref words[i]);
            MemoryMarshal.Write(into[(i * 8)..], in w);
        }
        return len;
    }
}
