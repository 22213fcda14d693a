using System.Globalization;
using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Samples;

/// <summary>
/// A thin-provisioned RAM disk in one small class: it keeps only the 4 KiB blocks that were
/// written, in a dictionary. Unwritten blocks read as zeros, and discarding a block frees it, so
/// the memory used follows the data stored rather than the device size.
/// <para>
/// It is the worked example of the target API (docs/target-api.md): it overrides
/// <see cref="Read"/>, <see cref="Write"/> and <see cref="Discard"/>, which makes the device
/// writable and able to discard, and <see cref="WriteZeroes"/> to free blocks rather than store
/// zeros. It does not override <see cref="BlockTarget.Flush"/>, so the device has no volatile
/// cache and the kernel sends neither FLUSH nor FUA.
/// </para>
/// <para>
/// Serving it as <c>/dev/ublkbN</c> (as root, with the ublk_drv module loaded):
/// <code>
/// using UblkSharp.Runtime;
/// using UblkSharp.Samples;
///
/// using var dev = UblkDevice.Create(new SparseMemoryTarget(1L &lt;&lt; 30), new DeviceOptions());
/// Console.WriteLine(dev.BlockPath);   // e.g. /dev/ublkb0: a 1 GiB disk using no memory yet
/// Console.ReadLine();                 // serve until Enter; Dispose stops and deletes the device
/// </code>
/// A device never disposes its target; this one holds only managed memory, so it needs no disposing.
/// </para>
/// <para>
/// Each queue calls the target from its own thread, so with <c>Queues</c> above 1 the methods run
/// concurrently: one lock guards the dictionary. Every method is a few copies under that lock,
/// never a wait, as a queue thread requires.
/// </para>
/// </summary>
public sealed class SparseMemoryTarget : BlockTarget
{
    /// <summary>The unit of allocation.</summary>
    public const int BlockSize = 4096;

    private readonly Dictionary<long, byte[]> _blocks = [];
    private readonly Lock _lock = new();

    /// <param name="size">The device size in bytes: a positive multiple of <see cref="BlockSize"/>.</param>
    public SparseMemoryTarget(long size)
    {
        if (size <= 0 || size % BlockSize != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), size, $"The size must be a positive multiple of {BlockSize} bytes");
        }
        Size = size;
    }

    public override long Size { get; }

    public override string Kind => "sparse-mem";

    public override IReadOnlyDictionary<string, string> Recipe
        => new Dictionary<string, string> { ["size"] = Size.ToString(CultureInfo.InvariantCulture) };

    /// <summary>Memory holding data: <see cref="BlockSize"/> bytes per block written and not since discarded.</summary>
    public long AllocatedBytes
    {
        get
        {
            lock (_lock)
            {
                return (long)_blocks.Count * BlockSize;
            }
        }
    }

    public override int Read(Span<byte> buffer, long offset)
    {
        if (!InRange(offset, buffer.Length))
        {
            return -Errno.EINVAL;
        }
        lock (_lock)
        {
            for (var done = 0; done < buffer.Length;)
            {
                var (index, at, n) = Step(offset + done, buffer.Length - done);
                var destination = buffer.Slice(done, n);
                if (_blocks.TryGetValue(index, out var block))
                {
                    block.AsSpan(at, n).CopyTo(destination);
                }
                else
                {
                    destination.Clear();
                }
                done += n;
            }
        }
        return buffer.Length;
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        if (!InRange(offset, data.Length))
        {
            return -Errno.EINVAL;
        }
        lock (_lock)
        {
            for (var done = 0; done < data.Length;)
            {
                var (index, at, n) = Step(offset + done, data.Length - done);
                if (!_blocks.TryGetValue(index, out var block))
                {
                    block = new byte[BlockSize];
                    _blocks.Add(index, block);
                }
                data.Slice(done, n).CopyTo(block.AsSpan(at));
                done += n;
            }
        }
        return data.Length;
    }

    /// <summary>Frees the blocks the range covers whole, and zeroes the covered part of the others.</summary>
    public override int Discard(long offset, long length) => Zero(offset, length, free: true);

    /// <summary>As <see cref="Discard"/>; with <paramref name="mayUnmap"/> false (REQ_NOUNMAP) blocks are zeroed but kept.</summary>
    public override int WriteZeroes(long offset, long length, bool mayUnmap) => Zero(offset, length, free: mayUnmap);

    private int Zero(long offset, long length, bool free)
    {
        if (!InRange(offset, length))
        {
            return -Errno.EINVAL;
        }
        lock (_lock)
        {
            for (long done = 0; done < length;)
            {
                var (index, at, n) = Step(offset + done, length - done);
                if (_blocks.TryGetValue(index, out var block))
                {
                    if (free && n == BlockSize)
                    {
                        _blocks.Remove(index);
                    }
                    else
                    {
                        block.AsSpan(at, n).Clear();
                    }
                }
                done += n;
            }
        }
        return 0;
    }

    private bool InRange(long offset, long length) => offset >= 0 && length >= 0 && offset <= Size - length;

    /// <summary>The block that <paramref name="position"/> falls in, where in it, and how much of the rest fits in it.</summary>
    private static (long Index, int At, int Count) Step(long position, long remaining)
    {
        var at = (int)(position % BlockSize);
        return (position / BlockSize, at, (int)Math.Min(BlockSize - at, remaining));
    }
}
