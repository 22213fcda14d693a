using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// One image of a backing chain: a qcow2 image (<see cref="Qcow2Image"/>) or a raw file. Each reads
/// its own range and sends what it does not hold to its backing layer; past its own size it reads
/// zeros, as qemu reads a backing file smaller than the image over it. Safe for several threads.
/// </summary>
internal abstract class Qcow2Layer : IDisposable
{
    protected Qcow2Layer(string path, SafeFileHandle file, long fileLength)
    {
        Path = path;
        File = file;
        FileLength = fileLength;
    }

    /// <summary>The file's absolute path.</summary>
    public string Path { get; }

    /// <summary>"qcow2" or "raw".</summary>
    public abstract string Format { get; }

    /// <summary>The guest-visible size of this layer.</summary>
    public abstract long Size { get; }

    /// <summary>The next layer down, or null.</summary>
    public Qcow2Layer? Backing { get; internal set; }

    protected SafeFileHandle File { get; }

    protected long FileLength { get; set; }

    /// <summary>Fills <paramref name="buffer"/> from <paramref name="offset"/>; 0 or a negative errno (-EIO for a corrupt table).</summary>
    public abstract int Read(Span<byte> buffer, long offset);

    /// <summary>
    /// How the run at <paramref name="offset"/> is stored, through the whole chain below: its
    /// length (1 to <paramref name="length"/>) and flags as <see cref="BlockTarget.GetAllocation"/>
    /// reports them, or a negative errno.
    /// </summary>
    public abstract long Status(long offset, long length, out AllocationFlags flags);

    /// <summary>
    /// Reads file bytes at <paramref name="fileOffset"/>; bytes past the end of the file read as
    /// zeros (qemu's file driver does the same). 0 or -EIO.
    /// </summary>
    protected int ReadFile(Span<byte> buffer, long fileOffset)
    {
        try
        {
            var done = 0;
            while (done < buffer.Length)
            {
                var n = RandomAccess.Read(File, buffer[done..], fileOffset + done);
                if (n <= 0)
                {
                    buffer[done..].Clear();
                    break;
                }
                done += n;
            }
            return 0;
        }
        catch (IOException)
        {
            return -Errno.EIO;
        }
    }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
        if (disposing)
        {
            Backing?.Dispose();
            File.Dispose();
        }
    }
}

/// <summary>A raw backing file: every byte is its own, up to its length.</summary>
internal sealed class RawLayer(string path, SafeFileHandle file, long fileLength) : Qcow2Layer(path, file, fileLength)
{
    public override string Format => "raw";

    public override long Size => FileLength;

    public override int Read(Span<byte> buffer, long offset) => ReadFile(buffer, offset);

    // Reported as data: holes in a raw file are not looked for (always a safe answer).
    public override long Status(long offset, long length, out AllocationFlags flags)
    {
        if (offset >= Size)
        {
            flags = AllocationFlags.Hole | AllocationFlags.Zero;
            return length;
        }
        flags = AllocationFlags.None;
        return Math.Min(length, Size - offset);
    }
}
