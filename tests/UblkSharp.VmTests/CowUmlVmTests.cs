using System.Diagnostics;

namespace UblkSharp.VmTests;

/// <summary>Our cow device and the real User-Mode Linux (run in the guest) on the same overlays, both ways.</summary>
[Trait("boot", "shared")]
public sealed class CowUmlVmTests : CowVmTest
{
    [Fact]
    public void OurDeviceAndUserModeLinuxShareOverlaysBothWays()
    {
        VmEnvironment.RequireDriver();
        Assert.True(File.Exists("/usr/bin/linux.uml") && File.Exists("/usr/bin/uml_moo"), "install user-mode-linux and uml-utilities (./test.sh does)");
        var baseImg = F("base.img");
        Sh($"truncate -s 64M {baseImg} && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {baseImg}");
        var payload = RandomFile("payload.bin", 3 << 20, 5);
        var mnt = F("mnt");
        Directory.CreateDirectory(mnt);

        // 1. Files written through our cow device (a new overlay).
        var ours = F("ours.cow");
        var (id, dev) = Add($"-t cow -f {ours} --create --backing {baseImg} -q 2 -d 32");
        try
        {
            Sh($"mount {dev} {mnt} && mkdir {mnt}/ours && cp {payload} {mnt}/ours/payload.bin && echo written by ublksharp > {mnt}/ours/note.txt && umount {mnt} && e2fsck -fn {dev}");
        }
        finally
        {
            Del(id);
        }

        // 2. UML in this guest: reads them through ubd0=OURS,BASE; writes through ubd1=COW,BASE (a COW file it creates).
        // (No e2fsck inside UML: Debian's 6.1 UML misreads some multi-segment reads of any COW device,
        // its own files too, so its e2fsck reports errors that uml_moo's merge of the same file does not have.)
        var umlCow = F("uml.cow");
        var init = F("init.sh");
        File.WriteAllText(init, $"""
            #!/bin/sh
            export PATH=/usr/sbin:/usr/bin:/sbin:/bin
            mount -t proc proc /proc
            mount -t ext4 /dev/ubda {mnt} || echo MOUNT-OURS-FAILED
            echo "SHA-OURS $(sha256sum < {mnt}/ours/payload.bin)"
            echo "NOTE-OURS $(cat {mnt}/ours/note.txt)"
            umount {mnt}
            mount -t ext4 /dev/ubdb {mnt} || echo MOUNT-UML-FAILED
            mkdir {mnt}/uml
            echo hello from uml > {mnt}/uml/hello.txt
            dd if=/dev/urandom of={mnt}/uml/random.bin bs=64k count=24 2>/dev/null
            echo "SHA-UML $(sha256sum < {mnt}/uml/random.bin)"
            umount {mnt} && echo UMOUNT-UML-OK
            sync
            poweroff -f

            """);
        Sh($"chmod +x {init}");
        var clock = Stopwatch.StartNew();
        // UML is slow under TCG (ptrace); its console's input must be /dev/null, not a pipe that ends.
        var console = Sh($"cd {Dir} && TMPDIR={Dir} timeout -k 10 900 linux.uml mem=48M ubd0={ours},{baseImg} ubd1={umlCow},{baseImg} " +
            $"root=/dev/root rootfstype=hostfs rootflags=/ rw init={init} quiet con=null con0=fd:0,fd:1 </dev/null", 960);
        Console.WriteLine($"linux.uml ran {clock.Elapsed.TotalSeconds:0} s");
        Assert.True(console.Contains("reboot: System halted", StringComparison.Ordinal), console);
        foreach (var want in new[] { $"SHA-OURS {Sha(payload)}", "NOTE-OURS written by ublksharp", "UMOUNT-UML-OK" })
        {
            Assert.True(console.Contains(want, StringComparison.Ordinal), $"UML's console lacks '{want}':\n{console}");
        }
        Assert.False(console.Contains("FAILED", StringComparison.Ordinal), console);
        var umlSha = console.Split('\n').Single(l => l.StartsWith("SHA-UML ", StringComparison.Ordinal))["SHA-UML ".Length..].Split(' ')[0];

        // 3. Our device mounts UML's overlay: fsck clean, its files there.
        (id, dev) = Add($"-t cow -f {umlCow} -q 2");
        try
        {
            Sh($"e2fsck -fn {dev}");
            Sh($"mount -o ro {dev} {mnt} && cp {mnt}/uml/random.bin {F("uml-random.out")} && cp {mnt}/uml/hello.txt {F("hello.out")} && umount {mnt}");
        }
        finally
        {
            Del(id);
        }
        Assert.Equal(umlSha, Sha(F("uml-random.out")));
        Assert.Equal("hello from uml\n", File.ReadAllText(F("hello.out")));

        // 4. uml_moo and cow merge agree byte for byte on both overlays.
        foreach (var cow in new[] { ours, umlCow })
        {
            Sh($"uml_moo {cow} {cow}.moo");
            var (code, output) = VmEnvironment.RunCli($"cow merge {cow} --into {cow}.merged");
            Assert.True(code == 0, output);
            Sh($"cmp {cow}.moo {cow}.merged && e2fsck -fn {cow}.merged");
        }
    }

}
