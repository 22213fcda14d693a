using UblkSharp.Interop;

namespace UblkSharp.Tests;

/// <summary>A scratch file opened with a raw fd for io_uring tests; deleted on dispose.</summary>
internal sealed class TempFile : IDisposable
{
    public TempFile(long size = 0, string? directory = null)
    {
        Path = System.IO.Path.Combine(directory ?? System.IO.Path.GetTempPath(), $"ublksharp-test-{Guid.NewGuid():N}");
        Fd = Libc.OpenOrThrow(Path, Libc.O_RDWR | Libc.O_CREAT | Libc.O_EXCL, 0x180);
        if (size > 0)
        {
            using var fs = new FileStream(Path, FileMode.Open, FileAccess.Write);
            fs.SetLength(size);
        }
    }

    public string Path { get; }

    public int Fd { get; }

    public void Dispose()
    {
        _ = Libc.close(Fd);
        File.Delete(Path);
    }
}
